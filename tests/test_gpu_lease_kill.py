"""A GPU lease held by a SIGKILLed process is free again within seconds, on the ephemeral API and on a real
`prefect server start`; the run waiting for it logs one INFO line naming the holder and no ERROR."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qlora_flow.gpu_locks import LOCK_DIR_ENV, holder_path, lock_path

ROOT = Path(__file__).resolve().parent.parent
HOLDER = Path(__file__).with_name("gpu_lease_holder.py")
HOST = "kill-test-host"


class Run:
    """A `gpu_lease_holder.py` process in its own process group (with the ephemeral server it may start)."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, str(HOLDER), HOST],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0]
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} from pid {self.proc.pid} in {timeout_s:.0f} s:\n" + "\n".join(self.lines))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@contextmanager
def runs(env: dict[str, str]) -> Iterator[list[Run]]:
    started: list[Run] = []
    try:
        yield started
    finally:
        for run in started:
            run.kill()


def check_killed_holder_frees_the_gpu(env: dict[str, str], locks: Path) -> Run:
    env = {**env, LOCK_DIR_ENV: str(locks), "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "INFO"}
    with runs(env) as started:
        holder = Run(env)
        started.append(holder)
        holder.wait_for("holding the GPU", 180)
        recorded = json.loads(holder_path(lock_path(locks, HOST, 0)).read_text())
        assert recorded["pid"] == holder.proc.pid and recorded["flow_run_id"]

        waiter = Run(env)
        started.append(waiter)
        waiting = waiter.wait_for("waiting for 1 GPU of host", 180)
        assert f"pid {holder.proc.pid}" in waiting and recorded["flow_run_id"] in waiting, waiting
        time.sleep(3)  # waiting quietly

        killed = time.time()
        os.killpg(holder.proc.pid, signal.SIGKILL)  # the holder and the ephemeral server it started
        leased = waiter.wait_for("holding the GPU", 30)
        latency = float(leased.split()[-1]) - killed
        print(f"GPU leased {latency:.2f} s after the holder was killed")  # shown with -s
        assert latency < 10
        assert json.loads(holder_path(lock_path(locks, HOST, 0)).read_text())["pid"] == waiter.proc.pid

        before_lease = waiter.lines[: waiter.lines.index(leased)]
        assert sum("waiting for" in line for line in before_lease) == 1, "\n".join(before_lease)
        errors = [line for line in before_lease if "ERROR" in line or "Traceback" in line]
        assert not errors, "\n".join(errors)
        return waiter


@pytest.mark.slow  # two ephemeral servers start on fresh databases: 90 s on a busy 2-core box
def test_a_killed_holder_frees_its_gpu_on_the_ephemeral_api(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="150",
    )  # a fresh database on a busy CI box
    check_killed_holder_frees_the_gpu(env, tmp_path / "locks")


@pytest.mark.slow
def test_a_killed_holder_frees_its_gpu_on_a_real_server(tmp_path):
    from prefect.client.orchestration import get_client

    from deployments.local import api_of, free_port, prefect_server
    from qlora_flow.gpu_runner import slot_name

    with prefect_server(tmp_path / "prefect", free_port(), tmp_path / "server.log") as env, api_of(env):
        check_killed_holder_frees_the_gpu(env, tmp_path / "locks")
        with get_client(sync_client=True) as client:  # the UI's Concurrency page: the waiter holds it now
            assert client.read_global_concurrency_limit_by_name(slot_name(HOST, 0)).active_slots == 1
