"""What every workflow script does first: log to its log file, and turn known failures into one clear line."""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback

# Failures whose message says all a user needs; anything else keeps its traceback.
KNOWN_ERRORS = ("ConfigError", "DataError", "HubUnavailable", "NonFiniteLoss", "MethodError")


@contextlib.contextmanager
def job(log_path: str):
    """Send stdout, stderr and logging to `log_path`; on a known error write `error: <message>` and exit 1."""
    with open(log_path, "w", buffering=1, encoding="utf-8") as log:
        sys.stdout = sys.stderr = log
        logging.basicConfig(stream=log, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
        try:
            yield logging.getLogger("conceptbench")
        except Exception as e:  # noqa: BLE001 - reported, then re-raised as an exit status
            if type(e).__name__ in KNOWN_ERRORS:
                print(f"error: {e}", file=log)
            else:
                traceback.print_exc(file=log)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
