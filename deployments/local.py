"""A local Prefect stack on loopback: server (embedded SQLite), process worker, registered deployments.

    python -m deployments.local up [--port 4200] [--config configs/demo.yaml]

Open http://127.0.0.1:4200, pick `qlora-finetune/manual` and click "Run". Ctrl-C stops everything.
The same helpers start the stack in the tests.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.deploy import PROCESS_POOL, ROOT, register
from qlora_flow.config import load_config

PREFECT = str(Path(sys.executable).with_name("prefect"))


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


def wait_healthy(api_url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}")
        try:
            with urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def prefect_server(home: Path, port: int, log_path: Path) -> Iterator[dict[str, str]]:
    """A `prefect server start` subprocess on 127.0.0.1:port; yields the environment for its clients."""
    env = stack_env(home, port)
    home.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home,
        )  # fmt: skip
        try:
            wait_healthy(env["PREFECT_API_URL"], proc)
            yield env
        finally:
            _stop(proc)


@contextmanager
def process_worker(env: dict[str, str], log_path: Path, pool: str = PROCESS_POOL) -> Iterator[subprocess.Popen]:
    """A process worker polling `pool`; flow runs start in the project root."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--prefetch-seconds", "5"],
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        try:
            yield proc
        finally:
            _stop(proc)


@contextmanager
def api_of(env: dict[str, str]) -> Iterator[None]:
    """Point this process's Prefect clients at the stack (settings are read once at import, not from os.environ)."""
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield


def up(port: int, config: str, home: Path) -> None:
    with prefect_server(home, port, home / "server.log") as env, api_of(env):
        ids = register(load_config(config))
        with process_worker(env, home / "worker.log") as worker:
            print(f"Prefect UI: http://127.0.0.1:{port}  (logs in {home})")
            for name in ids:
                print(f"  deployment {name}")
            print("Ctrl-C to stop.")
            try:
                worker.wait()
            except KeyboardInterrupt:
                pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local Prefect server + worker + deployments on loopback.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start the stack and register the deployments")
    start.add_argument("--port", type=int, default=4200)
    start.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    start.add_argument("--home", type=Path, default=ROOT / ".qlora-flow" / "prefect", help="PREFECT_HOME (SQLite DB)")
    args = parser.parse_args(argv)
    up(args.port, args.config, args.home.resolve())


if __name__ == "__main__":
    main()
