"""The warm worker (conceptbench/warm.py): a script handed to it runs as it would in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conceptbench import warm

SCRIPT = textwrap.dedent('''
    import os, signal, sys, time
    __file__ = "/elsewhere/original.py"  # as Snakemake's preamble points it at the script it copied
    from conceptbench.warm import handoff
    handoff()
    print("pid", os.getpid(), "cwd", os.getcwd(), "var", os.environ.get("JOB_VAR"), flush=True)
    print("an error line", file=sys.stderr, flush=True)
    if os.environ.get("JOB_SLEEP"):
        signal.signal(signal.SIGTERM, lambda *_: (print("checkpointed", flush=True), sys.exit(3)))
        open(os.environ["JOB_SLEEP"], "w").close()
        time.sleep(60)
    if os.environ.get("JOB_RAISE"):
        raise RuntimeError("boom")
    sys.exit(int(os.environ.get("JOB_CODE", "0")))
''')


@pytest.fixture
def worker(tmp_path):
    """A worker with nothing preloaded (the behaviour does not depend on what it imported)."""
    address = str(tmp_path / "socket")
    env = {**os.environ, warm.ENV: "0"}
    proc = subprocess.Popen([sys.executable, "-c", f"from conceptbench.warm import serve; serve({address!r}, preload=())"],
                            env=env)
    deadline = time.monotonic() + 60
    while not os.path.exists(address):
        assert proc.poll() is None and time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    yield address, proc
    proc.terminate()
    proc.wait(timeout=10)


def run_script(tmp_path, address, **env):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    full_env = {**os.environ, warm.ENV: address, **env}
    return subprocess.run([sys.executable, str(script)], cwd=work, env=full_env, capture_output=True, text=True,
                          timeout=60)


def test_a_handed_off_script_runs_in_a_child_of_the_worker_with_the_jobs_cwd_env_streams_and_status(tmp_path, worker):
    address, proc = worker
    for code in (0, 7):
        r = run_script(tmp_path, address, JOB_VAR="x", JOB_CODE=str(code))
        assert r.returncode == code
        pid = int(r.stdout.split()[1])
        assert os.path.exists(f"/proc/{pid}") is False  # the child has gone
        assert f"cwd {tmp_path / 'work'} var x" in r.stdout
        assert r.stderr == "an error line\n"
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        assert f.read().split() == []  # every child reaped
    r = run_script(tmp_path, address, JOB_RAISE="1")
    assert r.returncode == 1 and "RuntimeError: boom" in r.stderr


def test_the_child_is_a_child_of_the_worker(tmp_path, worker):
    address, proc = worker
    script = tmp_path / "ppid.py"
    script.write_text("import os\nfrom conceptbench.warm import handoff\nhandoff()\nprint(os.getppid())\n")
    r = subprocess.run([sys.executable, str(script)], env={**os.environ, warm.ENV: address}, capture_output=True,
                       text=True, timeout=60)
    assert int(r.stdout) == proc.pid


def test_without_a_worker_the_script_runs_in_its_own_process(tmp_path):
    r = run_script(tmp_path, str(tmp_path / "no-socket"), JOB_VAR="y", JOB_CODE="5")
    assert r.returncode == 5 and "var y" in r.stdout
    r = run_script(tmp_path, "0", JOB_VAR="z")
    assert r.returncode == 0 and "var z" in r.stdout


def test_a_worker_of_another_pythonpath_refuses_and_the_script_runs_itself(tmp_path, worker):
    address, proc = worker
    script = tmp_path / "ppid.py"
    script.write_text("import os\nfrom conceptbench.warm import handoff\nhandoff()\nprint(os.getppid())\n")
    env = {**os.environ, warm.ENV: address, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and int(r.stdout) != proc.pid


def test_sigterm_reaches_the_child_and_a_killed_client_takes_its_child_with_it(tmp_path, worker):
    address, proc = worker
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        flag = tmp_path / f"started-{sig}"
        client = subprocess.Popen([sys.executable, str(script)], env={**os.environ, warm.ENV: address,
                                  "JOB_SLEEP": str(flag)}, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child = int(open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()[0])
        client.send_signal(sig)
        out, _ = client.communicate(timeout=30)
        if sig == signal.SIGTERM:  # relayed: the job checkpoints and exits with its own status
            assert client.returncode == 3 and "checkpointed" in out
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z":
            assert time.monotonic() < deadline, "the child outlived its client"
            time.sleep(0.05)


def test_start_and_stop_from_the_workflow_process():
    address = warm.start()
    try:
        assert os.environ[warm.ENV] == address
        deadline = time.monotonic() + 300  # it listens once torch, diffusers and open_clip are imported
        while not os.path.exists(address):
            assert time.monotonic() < deadline, "the worker did not start listening"
            time.sleep(0.1)
    finally:
        warm.stop()
    assert warm.ENV not in os.environ and not os.path.exists(os.path.dirname(address))


def test_a_worker_starts_only_for_enough_jobs_that_import_torch():
    from types import SimpleNamespace

    def jobs(*names):
        return [SimpleNamespace(rule=SimpleNamespace(name=n)) for n in names]

    assert warm.worth_it(jobs(*["train"] * warm.MIN_JOBS))
    assert not warm.worth_it(jobs(*["train"] * (warm.MIN_JOBS - 1), "aggregate", "plot_gallery", "all"))


def test_the_preload_covers_the_classes_a_job_loads():
    """diffusers and transformers import lazily: with only their top modules preloaded, each child imported
    the pipeline module and everything under it again (1.7 s a job). After the preload, getting the classes
    the training and sampling jobs use imports nothing."""
    code = textwrap.dedent('''
        import importlib, sys
        from conceptbench.warm import default_preload
        names = default_preload()
        assert "conceptbench.methods.ddpo" in names and "conceptbench.methods._lora" not in names
        for name in names:
            importlib.import_module(name)
        before = set(sys.modules)
        import diffusers, transformers
        for name in ("StableDiffusionPipeline", "UNet2DConditionModel", "AutoencoderKL", "DDIMScheduler"):
            getattr(diffusers, name)
        for name in ("CLIPTextModel", "CLIPTokenizer"):
            getattr(transformers, name)
        print(sorted(set(sys.modules) - before))
    ''')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert r.stdout.strip() == "[]"
