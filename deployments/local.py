"""A local Prefect stack on loopback: server (embedded SQLite), process worker, registered deployments.

    python -m deployments.local up [--port 4200] [--config configs/demo.yaml]

Open http://127.0.0.1:4200, pick `qlora-finetune/manual` and click "Run". Ctrl-C or SIGTERM stops the
worker and the server (each in its own process group, terminated, then killed after a timeout).
A busy port or a second stack on the same state directory (pid file + flock) is refused with one
`error:` line before anything starts; logs are rotated (server.log -> server.log.1 ...), never overwritten.
The same helpers start the stack in the tests.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlsplit
from urllib.request import urlopen

import psutil
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.deploy import PROCESS_POOL, ROOT, register
from qlora_flow.config import load_config

PREFECT = str(Path(sys.executable).with_name("prefect"))
LOGS_KEPT = 5  # server.log.1 .. server.log.5
STOP_TIMEOUT_S = 20.0  # SIGTERM, then SIGKILL


class StackError(RuntimeError):
    """The stack cannot start; the message is the whole story (printed as one `error:` line)."""


class StackStopped(BaseException):
    """SIGTERM/SIGINT: unwinds `up()` so that every child is stopped on the way out."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stack_env(home: Path, port: int) -> dict[str, str]:
    """Environment for the server, worker and clients of one local stack."""
    return {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "DO_NOT_TRACK": "1",
        # flow runs started by the worker import the project from the checkout
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise StackError(
                f"port {port} on {host} is already in use (another Prefect server?); stop what uses it "
                f"(`ss -ltnp 'sport = :{port}'` shows it) or start on another port: --port / PORT=..."
            ) from None


def rotate_log(path: Path, keep: int = LOGS_KEPT) -> None:
    """path -> path.1 -> path.2 ... (the oldest beyond `keep` is dropped), so no start erases the last one's log."""
    if not path.exists():
        return
    for i in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))


def listens_on(pid: int, port: int) -> bool:
    """Whether the process or one of its descendants listens on the TCP port."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for process in tree:
        try:
            if any(
                c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                for c in process.net_connections("tcp")
            ):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False


def wait_healthy(api_url: str, proc: subprocess.Popen, timeout_s: float = 120, log_path: Path | None = None) -> None:
    """Until the server at api_url answers /health AND is this process (a server that already held the
    port would answer too, while ours fails to bind)."""
    port = urlsplit(api_url).port
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200 and listens_on(proc.pid, port):
                    return
        except (URLError, OSError):
            pass
        time.sleep(0.5)
    if proc.poll() is None:
        raise StackError(f"prefect server at {api_url} not healthy after {timeout_s:.0f} s (log: {log_path})")
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path and log_path.exists() else []
    raise StackError(
        f"prefect server exited with code {proc.returncode} before it was healthy"
        + (f": {tail[0].strip()}" if tail else "")
        + (f" (log: {log_path})" if log_path else "")
    )


def _signal_group(leader_pid: int, sig: int) -> None:
    try:
        os.killpg(leader_pid, sig)
    except ProcessLookupError:  # no process of the group is left
        pass


def _terminate_tree(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the process group led by pid and to every descendant (flow runs and training processes start
    their own sessions, out of the group's reach), SIGKILL to whatever is left after timeout_s."""
    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    _signal_group(pid, signal.SIGTERM)
    for process in tree:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    _signal_group(pid, signal.SIGKILL)  # anything the group started after the snapshot


def _stop(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    _terminate_tree(proc.pid, timeout_s)
    proc.wait()


@contextmanager
def prefect_server(
    home: Path, port: int, log_path: Path, on_start: Callable[[subprocess.Popen], None] | None = None
) -> Iterator[dict[str, str]]:
    """A `prefect server start` subprocess on 127.0.0.1:port; yields the environment for its clients."""
    env = stack_env(home, port)
    home.mkdir(parents=True, exist_ok=True)
    rotate_log(log_path)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,
        )
        try:
            if on_start:
                on_start(proc)
            wait_healthy(env["PREFECT_API_URL"], proc, log_path=log_path)
            yield env
        finally:
            _stop(proc)


@contextmanager
def process_worker(
    env: dict[str, str],
    log_path: Path,
    pool: str = PROCESS_POOL,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> Iterator[subprocess.Popen]:
    """A process worker polling `pool`; flow runs start in the project root."""
    rotate_log(log_path)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--prefetch-seconds", "5"],
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            if on_start:
                on_start(proc)
            yield proc
        finally:
            _stop(proc)


@contextmanager
def api_of(env: dict[str, str]) -> Iterator[None]:
    """Point this process's Prefect clients at the stack (settings are read once at import, not from os.environ)."""
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield


def _stop_leftovers(holder: dict) -> None:
    """Server and worker of a stack that died without stopping them (SIGKILL, OOM killer): found by the
    pid and start time recorded in its pid file (a pid reused since is left alone)."""
    for child in holder.get("children", []):
        try:
            process = psutil.Process(child["pid"])
            if process.create_time() != child["create_time"]:
                continue
            command = " ".join(process.cmdline()[1:4])
        except psutil.NoSuchProcess:
            continue
        print(
            f"warning: stopping {command} (pid {child['pid']}), left running by a local stack that died "
            f"(pid {holder.get('pid')})",
            file=sys.stderr,
            flush=True,
        )
        _terminate_tree(child["pid"])


@contextmanager
def stack_lock(home: Path, port: int) -> Iterator[Callable[[subprocess.Popen], None]]:
    """One stack per state directory: an flock held for the stack's life (released by the OS if it dies),
    and a pid file saying who holds it and which children it started. Yields the function that records
    a child; the children of a holder that died are stopped first."""
    home.mkdir(parents=True, exist_ok=True)
    pid_file = home / "stack.pid"
    with (home / "stack.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = json.loads(pid_file.read_text()) if pid_file.exists() else {}
            raise StackError(
                f"a local stack already runs on {home} (pid {holder.get('pid', '?')}, port {holder.get('port', '?')}); "
                f"stop it first (kill -TERM {holder.get('pid', '<pid>')}) or use another --home"
            ) from None
        if pid_file.exists():  # we hold the lock, so whoever wrote it is gone
            _stop_leftovers(json.loads(pid_file.read_text()))
        record = {"pid": os.getpid(), "port": port, "children": []}
        pid_file.write_text(json.dumps(record))

        def remember(proc: subprocess.Popen) -> None:
            record["children"].append({"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time()})
            pid_file.write_text(json.dumps(record))

        try:
            yield remember
        finally:
            pid_file.unlink(missing_ok=True)


def _stop_on_signals() -> None:
    def handler(signum, frame):
        # one unwinding is enough: a second Ctrl-C must not cut the children's shutdown short
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        raise StackStopped(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def up(port: int, config: str, home: Path) -> None:
    _stop_on_signals()
    try:
        with stack_lock(home, port) as remember:
            check_port_free(port)
            with prefect_server(home, port, home / "server.log", remember) as env, api_of(env):
                ids = register(load_config(config))
                with process_worker(env, home / "worker.log", on_start=remember) as worker:
                    print(f"Prefect UI: http://127.0.0.1:{port}  (logs in {home})")
                    for name in ids:
                        print(f"  deployment {name}")
                    print("Ctrl-C or kill -TERM to stop.", flush=True)
                    worker.wait()
                    raise StackError(f"the worker exited with code {worker.returncode} (log: {home / 'worker.log'})")
    except StackStopped as stop:
        print(f"stopped ({stop}): worker and server terminated", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local Prefect server + worker + deployments on loopback.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start the stack and register the deployments")
    start.add_argument("--port", type=int, default=4200)
    start.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    start.add_argument("--home", type=Path, default=ROOT / ".qlora-flow" / "prefect", help="PREFECT_HOME (SQLite DB)")
    args = parser.parse_args(argv)
    try:
        up(args.port, args.config, args.home.resolve())
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
