"""Preemption: stop at a step boundary with a checkpoint when SIGTERM arrives.

SLURM sends SIGTERM before it kills a job: on preemption, at the time limit, on `scancel`, and ahead
of time with `sbatch --signal=TERM@<seconds>`. Within `stop_on_sigterm()` the signal only sets a flag;
the training loop finishes its step, saves a checkpoint and raises `Preempted`, so the job exits
non-zero and Snakemake's retry resumes from that step.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Preempted(RuntimeError):
    """SIGTERM arrived: a checkpoint was saved and the run stopped; a rerun resumes from it."""


class StopRequest:
    """Set by the SIGTERM handler; the loop reads `requested` once per step."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def stop_on_sigterm():
    """Within the block SIGTERM sets the yielded request's flag instead of ending the process.

    The previous handler comes back on exit. Python handles signals in the main thread only, so in
    any other thread this yields a request that is never set.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        request.requested = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous)
