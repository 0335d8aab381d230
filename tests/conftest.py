"""Test configuration: the repository root is importable, so tests import the modules as scripts do."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
