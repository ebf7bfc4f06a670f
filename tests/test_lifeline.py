"""A training child whose flow process is SIGKILLed stops by itself instead of holding the GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The "flow process": starts a child in its own session (as run_training_in_child does) and waits.
PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    env = {**os.environ, "QLORA_FLOW_PARENT_PID": str(os.getpid())}
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env, start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(600)
    """
)
# The "training child": a grandchild in its group stands in for a torchrun worker.
CHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    from qlora_flow.lifeline import exit_with_parent
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(worker.pid, flush=True)
    exit_with_parent(poll_seconds=0.2)
    time.sleep(600)
    """
)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone for our purpose: it holds no memory; reaped by init shortly
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state in {"Z", "X"}


def test_training_child_and_its_workers_die_with_a_sigkilled_parent():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        child_pid = int(parent.stdout.readline())
        worker_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 60
        while not Path(f"/proc/{child_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # let the child start its worker and its watcher
        assert not _gone(child_pid), "the child must run while its parent lives"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while not _gone(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child_pid), "the training child outlived its SIGKILLed parent"
        deadline = time.monotonic() + 5
        while not _gone(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(worker_pid), "a worker in the training child's group outlived it"
    finally:
        parent.kill()


def test_no_watcher_without_a_parent_pid(monkeypatch):
    from qlora_flow.lifeline import PARENT_PID_ENV, exit_with_parent

    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    assert exit_with_parent() is None
