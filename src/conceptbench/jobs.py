"""What every workflow script does first: log to its log file, and turn known failures into one clear line."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import traceback

# Failures whose message says all a user needs; anything else keeps its traceback.
KNOWN_ERRORS = ("ConfigError", "DataError", "HubUnavailable", "HubContentError", "NonFiniteLoss", "MethodError",
                "Preempted")
# Storage failures get one plain line naming the file, whatever raised them.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


def describe(e: BaseException) -> str | None:
    """One line for a failure a user can act on without a traceback; None for anything else."""
    if type(e).__name__ in KNOWN_ERRORS:
        return str(e)
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
        where = f" while writing {e.filename}" if e.filename else ""
        return f"{STORAGE_ERRNOS[e.errno]}{where}: free space or point `results:` in the config elsewhere"
    return None


@contextlib.contextmanager
def job(log_path: str):
    """Send stdout, stderr and logging to `log_path`; on a known error write `error: <message>` and exit 1."""
    with open(log_path, "w", buffering=1, encoding="utf-8") as log:
        sys.stdout = sys.stderr = log
        logging.basicConfig(stream=log, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
        try:
            yield logging.getLogger("conceptbench")
        except Exception as e:  # noqa: BLE001 - reported, then re-raised as an exit status
            message = describe(e)
            if message is None:
                traceback.print_exc(file=log)
                message = f"{type(e).__name__}: {e}"
            print(f"error: {message}", file=log)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
