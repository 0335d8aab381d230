"""Test configuration: the repository root is importable, so tests import the modules as scripts do;
every test starts from the same seeds, so a draw a test forgot to seed is still reproducible; the slow tests
run first."""
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(items):
    """Tests marked slow first, each file's in its own order: pytest-xdist hands tests out in this order, so the
    long ones start early and the short ones even out the workers' ends (the suite's wall time is the last
    worker's)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
