"""The command-line entry of every script and tool: `run(main)` in its `if __name__ == "__main__"`.

A user-facing error of the project (a run folder, a data file, a checkpoint, a flag: OSError,
ValueError and the exception classes defined in this repository) prints one line,
`SCRIPT: error: MESSAGE`, and exits with 1; any other exception is a bug and keeps its traceback.
SUPCON_DEBUG=1 keeps the traceback of every error, for bug reports. Imports nothing heavy, so
that summarize.py stays free of torch.
"""
import os
import sys
from collections.abc import Callable
from pathlib import Path

DEBUG = "SUPCON_DEBUG"
HERE = Path(__file__).resolve().parent


def user_error(error: BaseException) -> bool:
    """Whether `error` is one the project raises for what a user can fix."""
    if isinstance(error, (OSError, ValueError)):
        return True
    module = sys.modules.get(type(error).__module__)
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().parent == HERE


def run(main: Callable, argv=None) -> None:
    """Call `main(argv)`; a user-facing error becomes one line on stderr and exit status 1."""
    try:
        main(argv)
    except Exception as error:  # noqa: BLE001 - sorted below: ours become one line, bugs keep their traceback
        if os.environ.get(DEBUG, "") not in ("", "0") or not user_error(error):
            raise
        script = Path(sys.argv[0]).name or "python"
        sys.stderr.write(f"{script}: error: {error}\n({DEBUG}=1 shows the traceback)\n")
        sys.exit(1)
