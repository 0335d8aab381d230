"""The run folder: lock, config, metrics, checkpoints, resume, results (its files: docs/data.md).

A folder that holds a run is refused unless --resume or --overwrite (which removes the project's
outputs only). Only rank 0 writes; checkpoints and JSON go through a temporary file and a rename.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import struct
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from util.checkpoint import atomic_save, read_checkpoint
from util.flags import as_json
from util.io import atomic_write_json, read_json

log = logging.getLogger("rundir")

# Everything the project writes into a run folder, embed.py's too: --overwrite removes these only.
OUTPUT_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "results.json", "data_report.json",
                "encoder.pth", "checkpoint.pth")
OUTPUT_PATTERNS = ("checkpoint-epoch*.pth", "*.tmp")
OUTPUT_FOLDERS = ("tensorboard", "embedding")
# A folder holding one of these holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "results.json")


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (holds a run, locked, damaged files)."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def outputs(folder: Path) -> list[Path]:
    found = [folder / name for name in (*OUTPUT_FILES, *OUTPUT_FOLDERS) if (folder / name).exists()]
    return found + [p for pattern in OUTPUT_PATTERNS for p in sorted(folder.glob(pattern))]


def load_state(path: Path) -> dict:
    """A checkpoint the project wrote (last.pt, best.pt), read by `models.read_checkpoint`."""
    return read_checkpoint(path)


# Lock files this process holds: POSIX locks belong to the process, so a second RunLock of a folder
# here is refused without opening the file (closing its descriptor would drop the first one's lock).
_HELD: dict[str, str] = {}


def _lock_pid(fd: int) -> int | None:
    """The kernel's pid of the holder of a conflicting lock on `fd` (Linux struct flock; else None)."""
    if not sys.platform.startswith("linux"):
        return None
    layout = "hhqqi4x"  # l_type, l_whence, l_start, l_len, l_pid
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return None
    kind, _, _, _, pid = struct.unpack(layout, answer)
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`RUN/run.lock`, an exclusive POSIX record lock (lockf), released by the kernel when the process
    ends (never stale); forked DataLoader workers do not hold it (flock locks were shared with them
    and outlived a killed run). The file names the holder for a refused writer. A POSIX lock drops
    when the process closes ANY descriptor of the file: only this class opens it, once (`_HELD`)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "run.lock"
        self.fd: int | None = None
        self.key = ""

    def _in_use(self, holder: str) -> RunFolderError:
        return RunFolderError(f"{self.path.parent} is in use ({holder}); wait for it, or use another --save_path")

    def _holder(self, fd: int) -> str:
        """Who holds the lock: the name in the file, unless it is not the holder's (a holder that
        has locked but not yet written finds the text of the run before it)."""
        text = os.read(fd, 4096).decode(errors="replace").strip()
        pid = _lock_pid(fd)
        named = re.match(r"pid (\d+) on (\S+) ", text)
        if named and (int(named[1]) == pid if pid else named[2] != socket.gethostname() or _alive(int(named[1]))):
            return text
        if pid:
            return f"pid {pid}, which has not written its name yet"
        return "a process that has not written its name yet"

    def acquire(self) -> None:
        self.key = os.path.realpath(self.path)
        if self.key in _HELD:
            raise self._in_use(f"{_HELD[self.key]}, this process")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = self._holder(fd)
                os.close(fd)
                raise self._in_use(holder) from None
            # A holder that ended between our open and lock removed the file we locked: lock the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        name = f"pid {os.getpid()} on {socket.gethostname()} since {_now()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{name}\n".encode(), 0)
        self.fd, _HELD[self.key] = fd, name

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: no writer can have it yet
            os.close(self.fd)
            self.fd = None
            _HELD.pop(self.key, None)


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


class RunDir:
    """The folder of one run, opened for writing (a context manager: the lock is released on exit).

    After construction `start` is the first epoch to train, `best` and `last` the evaluations so far.
    `modules`: checkpoint key -> module; "state_dict" holds the network in its released layout (so
    that `models.load_checkpoint` reads our checkpoints), other keys what it lacks (METER-ML heads).
    `script` is recorded in config.json (--resume refuses another script's run); `dataset` names the
    results for summarize.py; `select` ("AA" or "OA") picks the best evaluation; `steps_per_epoch`:
    to drop the TensorBoard steps a resumed run replays.
    """

    def __init__(self, path: Path, args: argparse.Namespace, ctx, *, script: str, dataset: str,
                 modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, extra: dict | None = None,
                 select: str = "AA", steps_per_epoch: int = 1) -> None:
        self.path, self.args, self.ctx = Path(path), args, ctx
        self.script, self.dataset, self.modules, self.optimizer = script, dataset, modules, optimizer
        self.extra, self.select = extra or {}, select
        self.lock = RunLock(self.path)
        self.started = time.time()
        self.start, self.best, self.last = 0, None, None
        self.timings: list[float] = []
        self.board = None
        if ctx.is_main:
            self._open()
        if args.resume is not None:
            try:
                self._resume()
            except BaseException:
                self.close()
                raise
        if getattr(args, "tensorboard", False) and ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter  # optional, checked in process.setup

            self.board = SummaryWriter(str(self.path / "tensorboard"), purge_step=self.start * steps_per_epoch)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None
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
        state = load_state(last)
        done = state["epoch"]
        if self.args.epochs < done:
            raise RunFolderError(f"{self.path} has trained {done} epochs; --epochs {self.args.epochs} would not "
                                 f"continue it (pass --epochs above {done} to extend it)")
        if self.args.epochs > done and "optimizer" not in state:
            raise RunFolderError(f"{last} holds the weights only (--keep_last weights): the run cannot be extended")
        damaged = [f"{key}.{name}" for key in self.modules for name, v in state[key].items()
                   if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if damaged:
            raise RunFolderError(f"{last}: non-finite values (NaN or inf) in {', '.join(damaged[:5])}"
                                 f"{' ...' if len(damaged) > 5 else ''}; resuming would train on damaged weights")
        for key, module in self.modules.items():
            module.load_state_dict(state[key])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
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
        state = {"epoch": epoch, **self.extra}
        state.update({key: module.state_dict() for key, module in self.modules.items()})
        state.update({"best": self.best, "last_eval": self.last})
        if resumable:
            state.update({"optimizer": self.optimizer.state_dict(), "rng": capture_rng()})
        return state

    def save(self, name: str, state: dict) -> None:
        if self.ctx.is_main:
            target = self.path / name
            try:
                atomic_save(state, target)
            except (OSError, RuntimeError) as error:
                # torch.save reports a full disk as OSError ENOSPC or as a RuntimeError of its zip writer
                full = getattr(error, "errno", None) == errno.ENOSPC or any(
                    text in str(error) for text in ("unexpected pos", "No space"))
                if not full:
                    raise
                kept = f"the previous {name} is intact" if target.exists() else f"no {name} was written"
                raise RunFolderError(f"no space left writing {target}; {kept}") from None

    def save_weights(self, name: str, epoch: int) -> None:
        """The network alone, released layout, 0-based `epoch` (the original's periodic checkpoints)."""
        weights = {k: v.cpu() for k, v in self.modules["state_dict"].state_dict().items()}
        self.save(name, {"epoch": epoch, **self.extra, "state_dict": weights})

    def evaluated(self, epoch: int, evaluation: dict) -> dict:
        """Record the evaluation after 0-based `epoch`, and the first best by `select` as best.pt;
        returns its entries for metrics.jsonl."""
        self.last = {"epoch": epoch + 1, **evaluation}
        score = self.last[self.select]
        if score is not None and (self.best is None or score > self.best[self.select]):
            self.best = self.last
            if self.args.save_best:
                self.save("best.pt", self.checkpoint(epoch + 1, resumable=False))
        keys = ("AA", "OA", "kappa", "macro_F1", "per_class", "n", "ignored", "classes", "confusion")
        return {k: self.last[k] for k in keys}

    def end_epoch(self, epoch: int, record: dict) -> None:
        """After 0-based `epoch`: its line in the log, its record in metrics.jsonl, last.pt."""
        self.timings.append(record["epoch_s"])
        left = (self.args.epochs - epoch - 1) * sum(self.timings[-3:]) / len(self.timings[-3:])
        line = (f"epoch {epoch + 1}/{self.args.epochs}: loss {record['train_loss']:.4f}, {record['samples_per_s']:.0f} "
                f"samples/s, {record['epoch_s']:.1f} s, about {datetime.timedelta(seconds=round(left))} left")
        if "AA" in record:
            line += (f"; AA {_pct(record['AA'])}, OA {_pct(record['OA'])} on {record['n']} samples "
                     f"({record['ignored']} ignored)")
        log.info(line)
        if self.board is not None:
            for key in ("train_loss", "train_ce", "train_supcon", "samples_per_s", "lr", "AA", "OA"):
                if record.get(key) is not None:
                    self.board.add_scalar(f"epoch/{key}", record[key], epoch + 1)
            self.board.flush()
        if self.ctx.is_main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, **record}) + "\n")
        self.save("last.pt", self.checkpoint(epoch + 1, resumable=True))

    # ------------------------------------------------------------------------- the end

    def data_report(self, splits: dict) -> dict:
        """Non-finite values met per split (name -> data set), summed over ranks: per file into
        data_report.json, a log line per split; returns the totals for results.json."""
        totals, files = {}, {}
        for name, dataset in splits.items():
            counts = dataset.nonfinite_counts.clone()
            if self.ctx.world > 1:
                counts = counts.to(self.ctx.device)
                dist.all_reduce(counts)
                counts = counts.cpu()
            files[name] = dataset.nonfinite_by_file(counts)
            totals[name] = {"files": len(files[name]),
                            **dict(zip(dataset.NONFINITE_KINDS, counts.sum((0, 1)).tolist()))}
            if files[name]:
                log.warning("%s split: %d NaN, %d +inf, %d -inf values replaced in %d files (every read counted; per "
                            "file in %s)", name, totals[name]["nan"], totals[name]["+inf"], totals[name]["-inf"],
                            len(files[name]), self.path / "data_report.json")
        labels = {name: d.label_summary for name, d in splits.items() if getattr(d, "label_summary", None)}
        if self.ctx.is_main:
            atomic_write_json(self.path / "data_report.json", {"nonfinite_values": files, "labels": labels})
        return {"nonfinite_values": totals}

    def finish(self, environment: dict, **extra) -> dict:
        """Write results.json; a resumed run with nothing left to train returns its saved results."""
        results_file = self.path / "results.json"
        if self.start == self.args.epochs and results_file.exists():
            return read_json(results_file, RunFolderError)
        results = {"dataset": self.dataset, "name": getattr(self.args, "name", None), "script": self.script,
                   "config": as_json(self.args), "last": self.last, "best_selected_on_eval_split": self.best,
                   "select": self.select, "environment": environment,
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


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
