"""`scripts/local_stack.sh`: SIGTERM stops the server and the worker, a busy port or a second stack on the same
state directory is one `error:` line before any success line, and logs survive a restart."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import psutil
import pytest

from deployments.local import StackError, _stop, free_port, rotate_log, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "local_stack.sh"


def _script(home: Path, port: int, **popen) -> subprocess.Popen:
    env = {**os.environ, "PORT": str(port), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        ["bash", str(SCRIPT), "--home", str(home)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_busy_port_is_an_error_before_any_success_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _script(tmp_path / "home", port)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"error: port {port} on 127.0.0.1 is already in use" in err
    assert "Prefect UI:" not in out and "Traceback" not in err
    assert not (tmp_path / "home" / "server.log").exists()  # nothing was started


def test_second_stack_on_the_same_state_directory_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "stack.pid").write_text('{"pid": 4242, "port": 4200}')
    with (home / "stack.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running stack holds
        proc = _script(home, free_port())
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"error: a local stack already runs on {home} (pid 4242, port 4200)" in err and "kill -TERM 4242" in err
    assert "Prefect UI:" not in out


def test_children_of_a_killed_stack_are_stopped_at_the_next_start(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    leftover = subprocess.Popen(["sleep", "300"], start_new_session=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    created = psutil.Process(leftover.pid).create_time()
    (home / "stack.pid").write_text(
        json.dumps({"pid": dead.pid, "port": 1, "children": [{"pid": leftover.pid, "create_time": created}]})
    )
    with socket.socket() as busy:  # so that the start ends right after the clean-up
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = _script(home, busy.getsockname()[1])
        _, err = proc.communicate(timeout=120)
    assert leftover.wait(timeout=30) is not None
    assert (
        f"warning: stopping 300 (pid {leftover.pid}), left running by a local stack that died (pid {dead.pid})" in err
    )
    assert proc.returncode == 1 and "already in use" in err


def test_rotate_log_keeps_previous_starts(tmp_path):
    log = tmp_path / "server.log"
    for start in range(7):
        rotate_log(log, keep=5)
        log.write_text(f"start {start}\n")
    assert log.read_text() == "start 6\n"
    assert [(tmp_path / f"server.log.{i}").read_text() for i in range(1, 6)] == [
        f"start {s}\n" for s in (5, 4, 3, 2, 1)
    ]
    assert not (tmp_path / "server.log.6").exists()


def test_a_server_that_is_not_ours_does_not_count_as_healthy(tmp_path):
    """The other server on the port answers /health while ours is still starting (and about to fail)."""

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    impostor = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    port = impostor.server_address[1]
    log = tmp_path / "server.log"
    log.write_text(f"Port {port} is already in use.\n")
    ours = subprocess.Popen(["sh", "-c", "sleep 2; exit 1"])
    try:
        with pytest.raises(
            StackError, match=f"exited with code 1 before it was healthy: Port {port} is already in use"
        ):
            wait_healthy(f"http://127.0.0.1:{port}/api", ours, timeout_s=30, log_path=log)
    finally:
        ours.kill()
        impostor.shutdown()


def test_stop_reaches_descendants_in_other_sessions_and_escalates():
    """Like a worker (its flow run starts a new session) that does not exit on SIGTERM."""
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen(['sleep', '300'], start_new_session=True); print('ready', flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline() == "ready\n"
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) == 2
    started = time.monotonic()
    _stop(proc, timeout_s=2)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert time.monotonic() - started < 10


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_stops_server_and_worker_and_logs_survive(tmp_path):
    home, port = tmp_path / "home", free_port()
    home.mkdir()
    (home / "server.log").write_text("log of the previous start\n")
    proc = _script(home, port)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any("Ctrl-C" in line for line in lines):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "stack did not come up"
        time.sleep(1)
    assert any(line.startswith(f"Prefect UI: http://127.0.0.1:{port}") for line in lines)
    children = psutil.Process(proc.pid).children(recursive=True)
    commands = [" ".join(c.cmdline()) for c in children]
    assert any("server start" in c for c in commands) and any("worker start" in c for c in commands), commands

    # a second stack on the same state directory is refused; no second worker
    second = _script(home, free_port())
    _, err = second.communicate(timeout=120)
    assert second.returncode == 1 and f"(pid {proc.pid}, port {port})" in err

    proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [" ".join(p.cmdline()) for p in alive]
    assert proc.wait(timeout=30) == 0
    reader.join(timeout=10)
    assert any("stopped (SIGTERM)" in line for line in lines)
    assert (home / "server.log.1").read_text() == "log of the previous start\n"
    assert "Uvicorn running" in (home / "server.log").read_text() or (home / "server.log").stat().st_size > 0
    assert not (home / "stack.pid").exists()
