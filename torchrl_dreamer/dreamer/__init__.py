"""DreamerV3 pieces (issue 3). So far: the tested math in :mod:`.functional`."""
