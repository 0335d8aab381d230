"""Every script's entry, `run(main)`: a user-facing error prints `SCRIPT: error: MESSAGE` and exits 1, a bug keeps
its traceback (docs/modules.md). Imports nothing heavy, so that summarize.py stays free of torch."""
import os
import sys
from collections.abc import Callable
from pathlib import Path

DEBUG = "SUPCON_DEBUG"
HERE = Path(__file__).resolve().parent


def user_error(error: BaseException) -> bool:
    """OSError, ValueError, or an exception class of this repository: what a user can fix."""
    if isinstance(error, (OSError, ValueError)):
        return True
    module = sys.modules.get(type(error).__module__)
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().parent == HERE


def run(main: Callable, argv=None) -> None:
    try:
        main(argv)
    except Exception as error:  # noqa: BLE001 - sorted below: ours become one line, bugs keep their traceback
        if os.environ.get(DEBUG, "") not in ("", "0") or not user_error(error):
            raise
        script = Path(sys.argv[0]).name or "python"
        sys.stderr.write(f"{script}: error: {error}\n({DEBUG}=1 shows the traceback)\n")
        sys.exit(1)
