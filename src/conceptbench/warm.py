"""A warm worker: one process that has imported torch, diffusers, transformers and open_clip forks a
child per workflow job, so a job starts in milliseconds instead of paying seconds of imports.

Most of a small job's time is starting Python and importing those libraries (measured in
docs/performance.md). When Snakemake runs the jobs on this machine (`snakemake --profile profiles/local`,
`make demo`), the Snakefile's `onstart` starts `python -m conceptbench.warm serve SOCKET` and sets
CONCEPTBENCH_WARM=SOCKET for the jobs; `onsuccess`/`onerror` stop it. Every workflow script begins
with `handoff()`: with a worker listening, the script's process (the one Snakemake
started and watches) becomes a client. It sends the worker its script, working directory, environment
and standard streams; the worker forks; the child runs the script from the top with the client's
environment, cwd and streams, exactly as `python script` would, and the client relays signals to it
(SIGTERM still makes training checkpoint) and exits with its status. With no worker, or one started
from another interpreter or PYTHONPATH, the script simply runs in its own process.

Forking is safe here because the worker runs one Python thread, has run no computation (torch's
thread pools start lazily, in the child) and never touches a GPU, as when PyTorch's DataLoader forks
its workers. On SLURM, jobs run on other machines and
no worker is started. A job's benchmark file still times it (wall clock), but its CPU and memory
columns then cover only the client process, not the child that did the work.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import warnings

ENV = "CONCEPTBENCH_WARM"          # the worker's socket, in the jobs' environment; "0" turns it off
CHILD = "CONCEPTBENCH_WARM_CHILD"  # set in the worker's children, so their handoff() returns at once
# diffusers and transformers import their classes lazily, on first use: the pipeline module, which pulls in
# the models, loaders, peft and quantizers (1.7 s), is named here, or every child would import it again. The
# method modules are added from the registry (default_preload).
PRELOAD = (
    "torch", "diffusers", "transformers", "open_clip", "safetensors.torch", "pandas", "matplotlib.pyplot",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "peft", "conceptbench.train", "conceptbench.sample", "conceptbench.metrics.evaluate", "conceptbench.plots",
    "conceptbench.aggregate", "conceptbench.world.oracle", "conceptbench.world.shipped",
)
MAX_MESSAGE = 1 << 20
LIGHT_RULES = {"prepare_dataset", "score_references", "aggregate", "plot_sweep", "plot_efficiency", "plot_gallery",
               "plot_learning", "all"}  # these import no torch: they start in about a second anyway


def _identity() -> dict:
    """What a child must share with its client to run the client's script as the client would."""
    return {"executable": sys.executable, "pythonpath": os.environ.get("PYTHONPATH", "")}


# --- client -------------------------------------------------------------------------------------------------

def handoff() -> None:
    """Run this process's script (sys.argv[0]: Snakemake's copy of the job's script with its preamble, which
    points `__file__` at the original) in the warm worker and exit with its status; return at once when there
    is no worker, or in the worker's child itself."""
    address = os.environ.get(ENV)
    if not address or address == "0" or os.environ.get(CHILD) or not os.path.exists(address):
        return
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(address)
        request = {"script": os.path.abspath(sys.argv[0]), "cwd": os.getcwd(), "env": dict(os.environ),
                   "argv": sys.argv, **_identity()}
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        reply = _read_line(conn)
    except OSError:
        return  # no worker after all (it stopped): run here
    if "pid" not in reply:
        return  # refused (another interpreter or PYTHONPATH): run here
    pid = reply["pid"]

    def relay(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, relay)
    result = _read_line(conn)
    if "status" not in result:
        print("warm worker: it went away before the job's status came back", file=sys.stderr)
    sys.exit(result.get("status", 1))


def _read_line(conn: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = conn.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            return {}
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise OSError("warm worker: message too long")
    return json.loads(data)


# --- worker -------------------------------------------------------------------------------------------------

def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds = b"", []
    while not data.endswith(b"\n"):
        msg, new_fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 3)
        if not msg:
            raise OSError("client closed the connection")
        data += msg
        fds += new_fds
    return json.loads(data), fds


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the client's process, run its script, never return."""
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams, kept open
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"], **{CHILD: "1"})
        sys.argv = list(request["argv"])
        sys.path.insert(0, os.path.dirname(request["script"]))
        threads = os.environ.get("OMP_NUM_THREADS", "")  # Snakemake's `threads:` for this job
        if threads.isdigit() and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(max(1, int(threads)))
        import runpy

        runpy.run_path(request["script"], run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported as the script's own process would report it
        import traceback

        traceback.print_exc()
    finally:
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def default_preload() -> tuple[str, ...]:
    """PRELOAD and the modules of conceptbench's own methods (the registry's list, so a new method is in it)."""
    from . import registry

    return (*PRELOAD, *(registry.module_name(m) for m in registry.available_methods()))


def serve(address: str, *, preload: tuple[str, ...] | None = None, parent: int | None = None) -> None:
    """Import `preload` (default: default_preload()), listen on `address`, fork a child per request; stop when
    `parent` has gone or on SIGTERM."""
    import importlib

    if preload is None:
        preload = default_preload()
    for name in preload:
        importlib.import_module(name)
    identity = _identity()
    if os.path.exists(address):
        os.unlink(address)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address + ".tmp")
    os.chmod(address + ".tmp", 0o600)
    listener.listen(64)
    os.rename(address + ".tmp", address)  # clients see the socket only once it accepts
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    wake_r, wake_w = os.pipe()  # SIGCHLD wakes select(): a finished job is answered at once
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket | None] = {}  # child pid -> its client's connection (None: client gone)
    try:
        while not stopping and (parent is None or os.getppid() == parent):
            watched = [c for c in children.values() if c is not None]
            ready, _, _ = select.select([listener, wake_r, *watched], [], [], 1.0)
            for conn in ready:
                if conn is wake_r:
                    os.read(wake_r, 512)
                elif conn is listener:
                    _accept(listener, identity, children)
                else:  # the client's end became readable: it has gone (killed); so must its child
                    pid = next(p for p, c in children.items() if c is conn)
                    children[pid] = None
                    conn.close()
                    _kill(pid)
            while children:
                pid, wait_status, usage = os.wait4(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                if conn is not None:
                    reply = {"status": _status(wait_status), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                             "max_rss_mb": round(usage.ru_maxrss / 1024, 1)}
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps(reply).encode() + b"\n")
                    conn.close()
    finally:
        for pid in list(children):
            _kill(pid)
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(address)


def _accept(listener: socket.socket, identity: dict, children: dict) -> None:
    conn, _ = listener.accept()
    try:
        conn.settimeout(10)
        request, fds = _recv_request(conn)
        conn.settimeout(None)
    except (OSError, ValueError):
        conn.close()
        return
    mine = {k: request.get(k) for k in identity}
    if mine != identity or len(fds) != 3:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"refused": "another interpreter or PYTHONPATH"}).encode() + b"\n")
        conn.close()
        for fd in fds:
            os.close(fd)
        return
    with warnings.catch_warnings():  # 3.12+ warns of any thread at fork: the library threads here (torch's,
        warnings.simplefilter("ignore", DeprecationWarning)  # jemalloc's) are idle, as when a DataLoader forks
        pid = os.fork()
    if pid == 0:
        listener.close()
        for other in children.values():
            if other is not None:
                other.close()
        conn.close()
        _run_child(request, fds)
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)


# --- lifecycle, for the Snakefile ------------------------------------------------------------------------------

MIN_JOBS = 5  # below this, the worker's own imports cost about what it would save


def worth_it(jobs) -> bool:
    """Whether a run of these (Snakemake) jobs gains from a worker: enough of them import the heavy libraries."""
    return sum(1 for job in jobs if job.rule.name not in LIGHT_RULES) >= MIN_JOBS


def start() -> str:
    """Start a worker (a child of this process, which it does not outlive) on a new socket, set ENV to its
    address for the jobs and return it. It listens once its imports are done (seconds): jobs that start
    before then, or after it failed, run in their own processes, so a short run loses nothing."""
    import subprocess
    import tempfile

    address = os.path.join(tempfile.mkdtemp(prefix="conceptbench-warm-"), "socket")
    proc = subprocess.Popen([sys.executable, "-m", "conceptbench.warm", "serve", address, str(os.getpid())],
                            stdin=subprocess.DEVNULL, env={**os.environ, ENV: "0"})
    os.environ[ENV] = address
    _started.append((proc, address))
    return address


_started: list = []


def stop() -> None:
    """Stop the workers this process started, and remove their sockets' folders."""
    import shutil

    os.environ.pop(ENV, None)
    while _started:
        proc, address = _started.pop()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - it would not stop: make it
            proc.kill()
        shutil.rmtree(os.path.dirname(address), ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3) or argv[0] != "serve":
        raise SystemExit("usage: python -m conceptbench.warm serve SOCKET [PARENT_PID]")
    serve(argv[1], parent=int(argv[2]) if len(argv) == 3 else None)


if __name__ == "__main__":
    main()
