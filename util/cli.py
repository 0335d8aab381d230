"""Every script's entry, `run(main)`: a user-facing error prints `SCRIPT: error: MESSAGE` and exits 1, a bug keeps
its traceback (docs/modules.md). Imports nothing heavy, so that summarize.py stays free of torch."""
import os
import sys
from collections.abc import Callable
from pathlib import Path

DEBUG = "SUPCON_DEBUG"
REPO = Path(__file__).resolve().parents[1]
# The project's modules and packages ("__main__": a script's own error classes).
OURS = {p.stem for p in REPO.glob("*.py")} | {"datasets", "util", "__main__"}


def user_error(error: BaseException) -> bool:
    """OSError, ValueError, or an exception class of this repository: what a user can fix."""
    if isinstance(error, (OSError, ValueError)):
        return True
    return type(error).__module__.split(".")[0] in OURS


def run(main: Callable, argv=None) -> None:
    try:
        main(argv)
    except Exception as error:  # noqa: BLE001 - sorted below: ours become one line, bugs keep their traceback
        if os.environ.get(DEBUG, "") not in ("", "0") or not user_error(error):
            raise
        script = Path(sys.argv[0]).name or "python"
        sys.stderr.write(f"{script}: error: {error}\n({DEBUG}=1 shows the traceback)\n")
        sys.exit(1)
