"""Checkpoint files: the one reader of every checkpoint (`read_checkpoint`: weights only, every failure a
`CheckpointError` naming the file and its cause, pickled objects named from the opcodes without running them), the
atomic writer, the checked load of a state dict into a module, and hash-checked downloads. Knows no architecture:
models.py holds the released layouts."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from util.io import atomic_write

logger = logging.getLogger(__name__)


class _Writer:
    """The file torch.save writes through, keeping the OSError of a failed write: torch's zip writer may report it
    as a RuntimeError without errno ("unexpected pos")."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as file:
        writer = _Writer(file)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through ``util.io.atomic_write``: a kill or a full disk leaves the previous file intact; a failed
    write raises its OSError (errno ENOSPC, EDQUOT, ...)."""
    return atomic_write(path, lambda tmp: _save(obj, tmp))


def unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def first(items: list[str], n: int = 5) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def unpickling_problem(error: pickle.UnpicklingError) -> tuple[str | None, str]:
    """The pickled global torch.load(weights_only=True) refused (None: no pickle at all), and the unpickler's words."""
    text = str(error)
    needs = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    return (needs.group(1) if needs else None), (detail.group(1) if detail else text[:200])


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: missing, empty, damaged, foreign, or holding pickled objects."""


_PUSHES_NOTHING = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME", "PROTO", "STOP"}


def pickled_globals(path: Path) -> tuple[int | None, set[str]]:
    """A checkpoint's pickle protocol and the "module.name" globals it refers to, from the opcodes: nothing runs.
    torch's weights-only unpickler reads protocol 2 only: a protocol 4 or 5 file fails before it names a global."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            stream = io.BytesIO(archive.read(name) if name else b"")
    else:
        stream = io.BytesIO(path.read_bytes())  # the legacy format: several pickles in a row
    protocol, found, memo = None, set(), []
    for _ in range(4):
        pushed: list = []  # strings, or None for anything else
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "PROTO":
                    protocol = max(protocol or 0, arg)
                if op.name == "GLOBAL":
                    found.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                    found.add(f"{pushed[-2]}.{pushed[-1]}")
                if op.name == "MEMOIZE":
                    memo.append(pushed[-1] if pushed else None)
                elif op.name in _PUSHES_NOTHING:
                    continue
                elif op.name.endswith("GET"):
                    pushed.append(memo[arg] if isinstance(arg, int) and arg < len(memo) else None)
                else:
                    pushed.append(arg if isinstance(arg, str) and "UNICODE" in op.name else None)
        except Exception:  # noqa: BLE001 - the raw storage bytes after the legacy pickles, or damage
            break
    return protocol, found


def _tensor_globals() -> set[str]:
    """The globals torch's weights-only unpickler allows (tensors, storages, dtypes, OrderedDict)."""
    try:
        from torch import _weights_only_unpickler as unpickler

        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except (ImportError, AttributeError):  # private API: without it, torch's own modules count as tensors
        return set()


def _objects_message(path: Path, needs: str) -> str:
    return (f"checkpoint {path} holds pickled Python objects ({needs}), which were not loaded: unpickling them could "
            f"run code, and torch.load(weights_only=True) reads tensors only. If you trust the file, load it once with "
            f"torch.load(path, weights_only=False) and re-save its state dict: torch.save(model.state_dict(), path) "
            f"for a pickled model, torch.save(checkpoint['state_dict'], path) for a training checkpoint")


def read_checkpoint(path: str | os.PathLike) -> Any:
    """A checkpoint file on the CPU, weights_only=True (no code in it runs); every failure a CheckpointError naming
    the file and its cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted download or copy?")
    try:
        with warnings.catch_warnings():  # a protocol above 2 is named below, when it matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needs, detail = unpickling_problem(err)
        if needs is not None:
            raise CheckpointError(_objects_message(path, needs)) from None
        protocol, found = pickled_globals(path)
        allowed = _tensor_globals()
        objects = sorted(g for g in found if g not in allowed and not (not allowed and g.startswith("torch.")))
        if objects:
            raise CheckpointError(_objects_message(path, first(objects, 3))) from None
        if protocol is not None and protocol > 2:
            raise CheckpointError(f"checkpoint {path} was pickled with protocol {protocol}, which torch.load("
                                  f"weights_only=True) does not read: re-save it with torch.save (protocol 2)"
                                  ) from None
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint, or is damaged ({detail})") from None
    except Exception as err:  # noqa: BLE001 - torch's unpickler raises many types on damaged bytes; none ran code
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint, or is truncated "
                              f"({type(err).__name__}: {str(err)[:200]})") from None




def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A bare state dict or one under "state_dict", without a "module." prefix."""
    checkpoint = read_checkpoint(path)

    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        if isinstance(checkpoint, dict):
            found = f"a dict with keys {first(sorted(map(str, checkpoint)))}"
        else:
            found = type(checkpoint).__name__
        raise ValueError(
            f"{path}: expected a state dict (names -> tensors) or a dict holding one under "
            f"'state_dict', found {found}"
        )
    consume_prefix_in_state_dict_if_present(state, "module.")
    return state


def check_finite(state: dict[str, Tensor], path: Path) -> None:
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ValueError(f"{path}: non-finite values (NaN or inf) in {len(nonfinite)} tensors: {first(nonfinite)}; "
                         f"the weights are damaged (a diverged run?)")


def load_state(model: nn.Module, state: dict[str, Tensor], path: Path, *, strict: bool = True,
               excused: list[str] = ()) -> tuple[list[str], list[str]]:
    """`state` (read from `path`) into `model`; returns (missing, unexpected) keys. Missing keys but `excused`, and
    unexpected keys, raise unless strict=False; shape mismatches and NaN / inf always."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = {"shape mismatches": mismatched}
    if strict:
        problems |= {"missing keys": [k for k in missing if k not in excused], "unexpected keys": unexpected}
    if any(problems.values()):
        raise ValueError(f"{path} does not fit {type(model).__name__}: " + "; ".join(
            f"{what} ({len(keys)}): {first(keys)}" for what, keys in problems.items() if keys
        ))
    check_finite(state, path)
    model.load_state_dict(state, strict=False)
    logger.info(
        "Loaded %s into %s (%d tensors)%s%s",
        path,
        type(model).__name__,
        len(state) - len(unexpected),
        f"; not in the file, left as initialised: {first(missing)}" if missing else "",
        f"; ignored: {first(unexpected)}" if unexpected else "",
    )
    return missing, unexpected


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    """`model` in the released layout, which the original's code loads: a model with an `arch` (the dual ResNet)
    {"arch", "state_dict", **extra} (the released files add epoch and optimizer), the SmallAlexNet encoders a bare
    state dict; CPU, atomic."""
    model = unwrap(model)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    if isinstance(getattr(model, "arch", None), str):
        checkpoint: dict[str, Any] = dict(arch=model.arch, state_dict=state, **extra)
    elif extra:
        raise ValueError(
            f"{type(model).__name__} checkpoints are bare state dicts (the released layout), "
            f"with no room for {sorted(extra)}: save those in a file of their own"
        )
    else:
        checkpoint = state
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(checkpoint, path)


def checkpoint_meta(script: str, arch: str, bands: dict[str, int], data=None, **more) -> dict:
    """A checkpoint's "meta", what it says about itself (docs/modules.md): the script, the architecture, the S1 / S2
    band counts, and of the training data set `data` its band names and normalisation statistics (None where it has
    none); `more`: the script's own entries (classes, normalize, window, ...). Plain JSON values, which
    torch.load(weights_only=True) reads."""
    meta = {"script": script, "arch": arch, "bands": dict(bands),
            **{key: getattr(data, key, None) for key in ("s1_band_names", "s2_band_names", "norm_stats")}, **more}
    return json.loads(json.dumps(meta, default=lambda value: value.tolist()))  # numpy arrays, tuples: lists


def read_meta(path: str | os.PathLike) -> dict | None:
    """What a checkpoint this project wrote says about itself ("meta": script, arch, bands, band names, classes,
    normalisation, evaluation window; docs/modules.md), or None for a file without it (older runs, released
    weights)."""
    checkpoint = read_checkpoint(path)
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    return meta if isinstance(meta, dict) else None


# --------------------------------------------------------------- downloads


def fetch(url: str, path: Path, progress: bool) -> None:
    """Download `url` to `path`: the only network access of the project (tests replace it)."""
    torch.hub.download_url_to_file(url, str(path), progress=progress)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_download(url: str, folder: Path, what: str, progress: bool = True, instead: str = "") -> Path:
    """`url` in `folder`, downloaded once; the hex after its file name's last "-" starts its SHA-256 (torch hub's
    convention), checked on every call. `what` names the file in messages; `instead`, the way round a failed
    download."""
    path = folder / url.rsplit("/", 1)[1]
    expected = path.stem.rsplit("-", 1)[1]
    cached = path.is_file()
    if not cached:
        logger.info("Downloading %s: %s -> %s", what, url, path)
        try:
            fetch(url, path, progress)
        except OSError as error:  # URLError (offline, DNS, proxy) and HTTP errors included
            raise ValueError(f"cannot download {what} from {url} ({getattr(error, 'reason', error)}): download it "
                             f"elsewhere and put it at {path}{f', or {instead}' if instead else ''}") from None
    found = sha256(path)
    if not found.startswith(expected):
        if cached:
            raise ValueError(f"{path}: SHA-256 {found[:len(expected)]}..., expected {expected}... (from {url}); "
                             "the cached file is damaged or another one: delete it to download it again")
        path.unlink(missing_ok=True)
        raise ValueError(f"{url}: the download has SHA-256 {found[:len(expected)]}..., expected {expected}...; "
                         "deleted (an interrupted download, or the file changed upstream)")
    return path
