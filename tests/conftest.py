import os
import sys
from pathlib import Path

import pytest
import torch

# tests import the scripted env as a module (recipes load it via "scripted_env:make_nan_env")
sys.path.insert(0, str(Path(__file__).parent))
# keep the 2-core machine responsive and results repeatable
torch.set_num_threads(1)
os.environ.setdefault("TORCHRL_DREAMER_TEST", "1")


@pytest.fixture
def tmp_runs(tmp_path):
    return tmp_path / "runs"
