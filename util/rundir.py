"""The run folder: lock, config, metrics, checkpoints, resume, results (its files: docs/data.md).

A folder that holds a run is refused unless --resume or --overwrite (which removes the project's
outputs only). Only rank 0 writes; checkpoints and JSON go through a temporary file and a rename.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from util.checkpoint import atomic_save, read_checkpoint
from util.flags import as_json
from util.io import atomic_write_json, read_json
from util.lock import RunFolderError, RunLock  # noqa: F401 - RunFolderError: named here too
from util.lock import now as _now

log = logging.getLogger("rundir")

# Everything the project writes into a run folder, embed.py's too: --overwrite removes these only.
OUTPUT_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "results.json", "data_report.json",
                "encoder.pth", "checkpoint.pth")
OUTPUT_PATTERNS = ("checkpoint-epoch*.pth", "*.tmp")
OUTPUT_FOLDERS = ("tensorboard", "embedding")
# A folder holding one of these holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "results.json")


def outputs(folder: Path) -> list[Path]:
    found = [folder / name for name in (*OUTPUT_FILES, *OUTPUT_FOLDERS) if (folder / name).exists()]
    return found + [p for pattern in OUTPUT_PATTERNS for p in sorted(folder.glob(pattern))]


def capture_rng() -> dict:
    """Torch RNG states (training draws from keyed generators; these cover anything else)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def default_run_path(script: str) -> Path:
    return Path("runs") / f"{script}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class Saved:
    """What the run's checkpoints hold: `modules`, checkpoint key -> module ("state_dict" the network in its released
    layout, so that `models.load_checkpoint` reads our checkpoints; other keys what it lacks, as METER-ML's heads),
    the optimiser, `extra` entries (the arch), `select` ("AA" or "OA"), the score of an evaluation that picks best.pt,
    and `meta`, what last.pt and best.pt say about themselves (`util.checkpoint.checkpoint_meta`; not in the
    original's periodic snapshots, which keep the released layout)."""
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    extra: dict = field(default_factory=dict)
    select: str = "AA"
    meta: dict | None = None


class RunDir:
    """The folder of one run, opened for writing (a context manager: the lock is released on exit).

    After construction `start` is the first epoch to train, `best` and `last` the evaluations so far. `script` is
    recorded in config.json (--resume refuses another script's run); `saved`: what its checkpoints hold.
    """

    def __init__(self, path: Path, args: argparse.Namespace, ctx, script: str, saved: Saved) -> None:
        self.path, self.args, self.ctx, self.script, self.saved = Path(path), args, ctx, script, saved
        self.lock = RunLock(self.path)
        self.started = self.epoch_ended = time.time()
        self.start, self.best, self.last = 0, None, None
        self.timings: list[float] = []
        self._board = None
        if ctx.is_main:
            self._open()
        if args.resume is not None:
            try:
                self._resume()
            except BaseException:
                self.close()
                raise

    def board(self, steps_per_epoch: int):
        """The TensorBoard writer of --tensorboard (None without it; rank 0 only), opened at the first call: a resumed
        run drops the steps it replays, `steps_per_epoch` each."""
        if self._board is None and getattr(self.args, "tensorboard", False) and self.ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter  # optional, checked in process.setup

            self._board = SummaryWriter(str(self.path / "tensorboard"), purge_step=self.start * steps_per_epoch)
        return self._board

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None
        self.lock.release()

    # ------------------------------------------------------------------------- opening

    def _open(self) -> None:
        args = self.args
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--save_path {self.path} is a file, not a folder")
        existing = [p for p in outputs(self.path) if p.name in RUN_FILES] if self.path.is_dir() else []
        if existing and not (args.resume or args.overwrite):
            hint = f"pass --resume {self.path} to continue it, " if (self.path / "last.pt").exists() else ""
            raise RunFolderError(f"{self.path} holds a run ({', '.join(p.name for p in existing)}); {hint}--overwrite "
                                 f"to start it over, or choose another --save_path")
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            if args.overwrite:
                for found in outputs(self.path):
                    shutil.rmtree(found) if found.is_dir() else found.unlink()
            if args.resume is None:
                atomic_write_json(self.path / "config.json", self._config())
        except BaseException:
            self.lock.release()
            raise

    def _config(self) -> dict:
        """config.json: every flag (paths absolute, so that tools work from any folder), what was
        resolved for this machine, and the script."""
        config = {k: v for k, v in as_json(self.args).items() if k not in ("resume", "overwrite")}
        for key in ("data_root", "save_path", "model_path", "s1_backbone", "s2_backbone"):
            if config.get(key) not in (None, "random"):
                config[key] = str(Path(config[key]).resolve())
        ctx = self.ctx
        config.update({"script": self.script, "device": str(ctx.device), "amp": ctx.amp,
                       "channels_last": ctx.channels_last, "workers": ctx.workers})
        return config

    def _resume(self) -> None:
        config = read_json(self.path / "config.json", RunFolderError)
        if config.get("script", self.script) != self.script:
            raise RunFolderError(f"{self.path} is a run of {config['script']}, not of {self.script}: resume it with "
                                 f"{config['script']}")
        last = self.path / "last.pt"
        if not last.exists():
            log.warning("%s has no last.pt (killed before its first epoch ended): starting the run from the beginning",
                        self.path)
            self._keep_metrics_before(1)
            return
        state = read_checkpoint(last)
        done = state["epoch"]
        if self.args.epochs < done:
            raise RunFolderError(f"{self.path} has trained {done} epochs; --epochs {self.args.epochs} would not "
                                 f"continue it (pass --epochs above {done} to extend it)")
        if self.args.epochs > done and "optimizer" not in state:
            raise RunFolderError(f"{last} holds the weights only (--keep_last weights): the run cannot be extended")
        damaged = [f"{key}.{name}" for key in self.saved.modules for name, v in state[key].items()
                   if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if damaged:
            raise RunFolderError(f"{last}: non-finite values (NaN or inf) in {', '.join(damaged[:5])}"
                                 f"{' ...' if len(damaged) > 5 else ''}; resuming would train on damaged weights")
        for key, module in self.saved.modules.items():
            module.load_state_dict(state[key])
        if "optimizer" in state:
            self.saved.optimizer.load_state_dict(state["optimizer"])
            restore_rng(state["rng"])
        self.start, self.best, self.last = done, state["best"], state["last_eval"]
        self._keep_metrics_before(done + 1)
        if done == self.args.epochs:
            log.info("%s is finished (%d epochs): nothing to do, nothing changed; pass a larger --epochs to extend it",
                     self.path, done)
        else:
            log.info("resumed %s after epoch %d of %d", self.path, done, self.args.epochs)

    def _keep_metrics_before(self, epoch: int) -> None:
        """Forget records from `epoch` on (replayed now) and a last line cut short by a kill."""
        file = self.path / "metrics.jsonl"
        if not (self.ctx.is_main and file.exists()):
            return
        lines = [line for line in file.read_text().splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: record %d is cut short (killed while writing it?): dropped", file, number)
                continue
            if record["epoch"] < epoch:
                kept.append(line)
        if len(kept) < len(lines):
            file.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------------- during the run

    def checkpoint(self, epoch: int, *, resumable: bool) -> dict:
        """The networks in their released layout, the evaluations, and if `resumable` optimiser and RNG."""
        state = {"epoch": epoch, **self.saved.extra}
        if self.saved.meta is not None:
            state["meta"] = self.saved.meta
        state.update({key: module.state_dict() for key, module in self.saved.modules.items()})
        state.update({"best": self.best, "last_eval": self.last})
        if resumable:
            state.update({"optimizer": self.saved.optimizer.state_dict(), "rng": capture_rng()})
        return state

    def save(self, name: str, state: dict) -> None:
        if self.ctx.is_main:
            target = self.path / name
            try:
                atomic_save(state, target)
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
                kept = f"the previous {name} is intact" if target.exists() else f"no {name} was written"
                raise RunFolderError(f"no space left writing {target}; {kept}") from None

    def save_weights(self, name: str, epoch: int) -> None:
        """The network alone, released layout, 0-based `epoch` (the original's periodic checkpoints)."""
        weights = {k: v.cpu() for k, v in self.saved.modules["state_dict"].state_dict().items()}
        self.save(name, {"epoch": epoch, **self.saved.extra, "state_dict": weights})

    def evaluated(self, epoch: int, evaluation: dict) -> dict:
        """Record the evaluation after 0-based `epoch`, and the first best by `saved.select` as best.pt; returns
        `evaluation`, for metrics.jsonl."""
        self.last = {"epoch": epoch + 1, **evaluation}
        select = self.saved.select
        score = self.last[select]
        if score is not None and (self.best is None or score > self.best[select]):
            self.best = self.last
            if self.args.save_best:
                self.save("best.pt", self.checkpoint(epoch + 1, resumable=False))
        return evaluation

    def end_epoch(self, epoch: int, record: dict, summary: str = "") -> None:
        """After 0-based `epoch`: a log line (`summary`, the numbers the script chose, and the time left), the
        record's numbers in TensorBoard, the record in metrics.jsonl, last.pt."""
        now = time.time()
        self.timings.append(now - self.epoch_ended)
        self.epoch_ended = now
        left = (self.args.epochs - epoch - 1) * sum(self.timings[-3:]) / len(self.timings[-3:])
        log.info("epoch %d/%d: %s%sabout %s left", epoch + 1, self.args.epochs, summary, "; " if summary else "",
                 datetime.timedelta(seconds=round(left)))
        if self._board is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._board.add_scalar(f"epoch/{key}", value, epoch + 1)
            self._board.flush()
        if self.ctx.is_main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, **record}) + "\n")
        self.save("last.pt", self.checkpoint(epoch + 1, resumable=True))

    def write_json(self, name: str, data: dict) -> None:
        """A JSON file of the run (rank 0 only), written atomically."""
        if self.ctx.is_main:
            atomic_write_json(self.path / name, data)

    # ------------------------------------------------------------------------- the end

    def finish(self, environment: dict, dataset: str, **extra) -> dict:
        """Write results.json (`dataset` names the results for summarize.py); a resumed run with nothing left to train
        returns its saved results."""
        results_file = self.path / "results.json"
        if self.start == self.args.epochs and results_file.exists():
            return read_json(results_file, RunFolderError)
        results = {"dataset": dataset, "name": getattr(self.args, "name", None), "script": self.script,
                   "config": as_json(self.args), "last": self.last, "best_selected_on_eval_split": self.best,
                   "select": self.saved.select, "environment": environment,
                   "started": datetime.datetime.fromtimestamp(self.started).astimezone().isoformat(timespec="seconds"),
                   "finished": _now(), "wall_s": time.time() - self.started, **extra,
                   "note": "'last' is the last evaluation; 'best_selected_on_eval_split' is the best evaluation, "
                           "chosen on the evaluation split itself (as the original reported its best evaluation): "
                           "optimistic"}
        if self.ctx.is_main:
            atomic_write_json(results_file, results)
            if getattr(self.args, "keep_last", "full") == "weights":
                self.save("last.pt", self.checkpoint(self.args.epochs, resumable=False))
        return results
