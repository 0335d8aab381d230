"""Reading a finished or running run folder: which script wrote it (config.json), its results, its checkpoints.
The tools (embed.py, predict.py) open runs through it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from util.io import read_json
from util.lock import RunFolderError

KINDS = ("meterml_finetune", "meterml_pretrain", "dfc_finetune", "sen12ms_pretrain")


class NotARunError(ValueError):
    """A folder that holds no run of the project's scripts."""


@dataclass
class RunInfo:
    path: Path
    kind: str  # one of KINDS
    dataset: str  # "METER-ML" or "DFC2020", ... as results.json names it
    config: dict
    results: dict | None
    checkpoint: Path | None = None  # a checkpoint file named instead of the folder: the one checkpoint_path gives


def run_kind(config: dict) -> str:
    script = config.get("script")
    if script not in KINDS:
        raise NotARunError(f"config.json names no script of this project (script: {script!r}); runs of "
                           f"{', '.join(KINDS)} record theirs")
    return script


def read_run(path: Path) -> RunInfo:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise NotARunError(f"{path} is not a run folder: no config.json (run folders of meterml_finetune.py, "
                           f"dfc_finetune.py, meterml_pretrain.py or sen12ms_pretrain.py hold config.json and "
                           f"last.pt)")
    config = read_json(path / "config.json", RunFolderError)
    results = read_json(path / "results.json", RunFolderError) if (path / "results.json").is_file() else None
    kind = run_kind(config)
    dataset = (results or {}).get("dataset") or {
        "meterml_finetune": "METER-ML", "meterml_pretrain": "METER-ML pre-training",
        "dfc_finetune": "DFC2020", "sen12ms_pretrain": "SEN12MS pre-training"}[kind]
    return RunInfo(path, kind, dataset, config, results)


def checkpoint_path(run: RunInfo, name: str | None) -> Path:
    """`name` in the run folder, else last.pt (a METER-ML pre-training's encoder.pth if present); the run's own
    `checkpoint` file when it was opened from one."""
    if run.checkpoint is not None:
        return run.checkpoint
    if name is None:
        name = "encoder.pth" if run.kind == "meterml_pretrain" and (run.path / "encoder.pth").is_file() else "last.pt"
    path = run.path / name
    if not path.is_file():
        present = sorted(p.name for p in run.path.iterdir() if p.suffix in (".pt", ".pth"))
        raise FileNotFoundError(f"{path} not found (checkpoints in the run folder: {present or 'none'}; "
                                f"were they deleted after the run?)")
    return path
