"""Test configuration: the repository root is importable, so tests import the modules as scripts do;
every test starts from the same seeds, so a draw a test forgot to seed is still reproducible."""
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
