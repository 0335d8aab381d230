"""The README's quick start, run as written from a fresh shell with nothing activated."""
import os
import re
import subprocess
from pathlib import Path

import pytest

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
