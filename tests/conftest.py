"""Makes tests/_helpers.py importable from every test folder (the test folders are not packages), and the
fixtures several folders share."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test, whatever the process was given: the batch split, the token split and
    Mobile-Former's two-thread block only engage with two or more."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def threads():
    """`torch.set_num_threads`, for tests that set their own intra-op thread counts; the count the process had is
    restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
