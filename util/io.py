"""Files written whole or not at all, JSON read with the damaged file named, and whether two paths are one file."""
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """The JSON content of ``path``; a damaged file raises ``error`` naming it and the cause."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as cause:
        raise error(f"{path} is not valid JSON (truncated or edited? {cause})") from None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)``, fsync, rename over ``path``: a kill or a full disk leaves the previous file intact; the
    temporary name is unique to this process, so two writers never share it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike, content: Any, indent: int | None = 2) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(content, indent=indent)))


def same_file(a: Path, b: Path) -> bool:
    """`a` and `b` are one file: the same path once links are resolved, or (both existing) the same inode."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False
