import os
import sys
from pathlib import Path

import pytest
import torch

# tests/ on sys.path, for the tests in its sub-folders too: the shared modules import by name
# (helpers: tiny settings; contract: the loss-contract base; scripted_env: recipes load it as
# "scripted_env:make_nan_env"). Test files need unique basenames across the sub-folders (no
# __init__.py: pytest imports each by its basename).
sys.path.insert(0, str(Path(__file__).parent))
# keep the 2-core machine responsive and results repeatable
torch.set_num_threads(1)
os.environ.setdefault("TORCHRL_DREAMER_TEST", "1")

# The recipe smoke and resume tests can run their networks on another device:
#   TORCHRL_DREAMER_TEST_DEVICE=cuda pytest -k "smoke or resume_continues"
# (default cpu; CI has no GPU).
TEST_DEVICE = os.environ.get("TORCHRL_DREAMER_TEST_DEVICE", "cpu")


@pytest.fixture
def device_args():
    """``device=...`` override for recipe tests ([] on the default cpu)."""
    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"TORCHRL_DREAMER_TEST_DEVICE={TEST_DEVICE} but CUDA is not available")
    return [] if TEST_DEVICE == "cpu" else [f"device={TEST_DEVICE}"]


@pytest.fixture
def tmp_runs(tmp_path):
    return tmp_path / "runs"
