"""bench/gpu_check.sh --tiny on CPU: every script passes, and every figure of bench_train.py is printed."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("dfc_finetune.py", "meterml_finetune.py", "meterml_pretrain.py", "sen12ms_pretrain.py", "packed_loader",
           "bench_predict.py", "bench_train.py")
# What bench_train.py measures on CPU (compile is GPU-only by default; fast evaluates as bf16).
CONFIGS = ("original", "default", "bf16", "fast")
FIGURES = [("step", c) for c in CONFIGS] + [("eval", c) for c in CONFIGS[:3]] + [("loader", c) for c in CONFIGS]
FIGURE_LINE = re.compile(r"^(step|eval|loader|compile) (\w+) batch=(\d+) (\d+)px [^:]*: "
                         r"([\d.]+) samples/s, peak ([\d.]+) (GiB|MiB RSS), warm-up ([\d.]+) s$")


@pytest.mark.slow
def test_gpu_check_tiny():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    lines = done.stdout.splitlines()
    for script in SCRIPTS:
        passed = rf"gpu_check: {re.escape(script)} .*: PASS in \d+ s$"
        assert any(re.match(passed, line) for line in lines), (script, output)
    figures = {}
    for line in lines:
        match = FIGURE_LINE.match(line)
        if match:
            part, config, batch, size, rate, peak, _, warmup = match.groups()
            figures[part, config] = (int(batch), int(size), float(rate), float(peak), float(warmup))
    assert sorted(figures) == sorted(FIGURES), output
    for (part, config), (batch, size, rate, peak, warmup) in figures.items():
        assert batch == (8 if part == "eval" else 4) and size == 32, (part, config)
        assert rate > 0 and peak > 0 and warmup >= 0, (part, config, rate, peak, warmup)
    assert "| measurement | configuration |" in done.stdout, output
    packed = [line for line in lines if line.startswith("gpu_check: packed data: loader default batch=4 32px")]
    assert len(packed) == 1 and float(packed[0].split(" samples/s")[0].split()[-1]) > 0, output
    predict = re.compile(r"gpu_check: predict windows/s: scene ([\d.]+) .* evaluation loop ([\d.]+) ")
    rates = [m.groups() for m in map(predict.match, lines) if m]
    assert len(rates) == 1 and min(map(float, rates[0])) > 0, output
