"""The README's quick start, run as written from a fresh shell with nothing activated."""
import importlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import rasterio

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.mark.slow
def test_the_quick_start_runs_from_a_fresh_shell():
    commands = quick_start_commands()
    assert commands[:2] == ["make demo", "make test"]
    # A fresh login: no virtual environment active, the system's PATH only.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "OMP_NUM_THREADS": "1"}
    for target in ("demo", "test"):  # the targets exist and set .venv up first (a dry run: the real ones take minutes)
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, env=env, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
    rest = " && ".join(commands[2:])  # the lines after the make commands run in one shell, in order
    done = subprocess.run(["bash", "-c", rest], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--use_sup_con" in done.stdout and "--model_path" in done.stdout


def own_data_commands() -> list[str]:
    """The README's own-data block, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("Your own pairs and new imagery", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.mark.slow
def test_the_own_data_block_runs_as_written_at_small_sizes(tmp_path, monkeypatch):
    # The README's lines in order, each script's main called in this process from a fresh folder; only the
    # sizes shrink.
    smaller = {"manifest own/": "manifest own/ --n 20", "--epochs 12": "--epochs 1",
               "--like own/pairs.csv": "--like own/pairs.csv --rows 2 --cols 2"}
    monkeypatch.chdir(tmp_path)
    for command in own_data_commands():
        for text, small in smaller.items():
            command = command.replace(text, small)
        python, script, *argv = shlex.split(command)
        assert python == "python" and script.endswith(".py")
        importlib.import_module(script[:-3]).main(argv)
    results = json.loads((tmp_path / "own" / "run" / "results.json").read_text())
    assert results["dataset"] == "manifest" and results["config"]["use_sup_con"]
    assert results["config"]["epochs"] == 1 and results["config"]["normalize"] == "stats"
    assert len((tmp_path / "own" / "val.csv").read_text().splitlines()) == 1 + 5
    with rasterio.open(tmp_path / "own" / "map.tif") as src:
        assert (src.width, src.height) == (128, 128)
