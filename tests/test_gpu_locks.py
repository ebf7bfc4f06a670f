"""Per-host GPU locks on flock: exclusive, released by the kernel when the holder dies, waited for without polling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import qlora_flow.gpu_locks as gpu_locks
from qlora_flow.gpu_locks import LOCK_DIR_ENV, hold_gpus, holder_path, lock_dir, lock_path

ROOT = Path(__file__).resolve().parent.parent


REAL_UUIDS_BY_INDEX = gpu_locks._uuids_by_index


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    # GPUs named by index, whatever this machine has: the UUID tests below bring their own nvidia-smi
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_locks, "_uuids_by_index", lambda: {})
    return tmp_path / "locks"


def _taken_within(seconds: float) -> bool:
    """Whether a one-GPU lease of host h can be taken (in another thread) within `seconds`; gives it back."""
    got, stop = threading.Event(), threading.Event()

    def lease() -> None:
        try:
            with hold_gpus("h", 1, 1, cancel=stop):
                got.set()
        except gpu_locks.LeaseCancelled:
            pass

    thread = threading.Thread(target=lease)
    thread.start()
    taken = got.wait(seconds)
    stop.set()
    thread.join(10)
    return taken


def test_workers_with_different_visible_gpus_do_not_wait_for_each_other_but_never_share_one(monkeypatch):
    """A worker per GPU (CUDA_VISIBLE_DEVICES=0 / =1) sees "GPU 0" in both: the locks name physical GPUs."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with hold_gpus("h", 1, 1):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        assert _taken_within(5)  # another physical GPU: free
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,1")
        with hold_gpus("h", 2, 1) as ids:  # index 1 here is physical 1, held above: it gets index 0 (physical 2)
            assert ids == [0]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
        assert not _taken_within(0.5)  # the same physical GPU under the same name: waits


def test_a_gpu_named_by_uuid_or_index_is_one_lock(monkeypatch, tmp_path, private_lock_dir):
    """With nvidia-smi, locks are named by UUID: CUDA_VISIBLE_DEVICES=1 and =GPU-bbbb (a UUID prefix, as CUDA
    accepts) are the same GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0, GPU-aaaa-1111\\n1, GPU-bbbb-2222\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(gpu_locks, "_uuids_by_index", REAL_UUIDS_BY_INDEX)
    REAL_UUIDS_BY_INDEX.cache_clear()
    try:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
        with hold_gpus("h", 1, 1):
            assert [p.name for p in private_lock_dir.glob("*.lock")] == ["gpu-h-GPU-bbbb-2222.lock"]
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
            assert not _taken_within(0.5)
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
            assert _taken_within(5)
    finally:
        REAL_UUIDS_BY_INDEX.cache_clear()


def test_lock_dir_is_per_user_unless_configured(monkeypatch, tmp_path):
    assert lock_dir() == tmp_path / "locks"
    monkeypatch.delenv(LOCK_DIR_ENV)
    assert lock_dir() == Path(f"/tmp/qlora-flow-gpu-locks-{os.getuid()}")


def test_an_unusable_lock_dir_says_which_variable_to_set(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "a-file" / "locks"))
    with pytest.raises(OSError, match=f"cannot create GPU lock files in {tmp_path}/a-file/locks .*set {LOCK_DIR_ENV}"):
        with hold_gpus("h", 1, 1):
            pass


def test_holder_file_names_the_holder_while_held_and_goes_with_the_lease(private_lock_dir):
    with hold_gpus("h", 2, 2, {"flow_run_id": "fr-1", "task_run_id": "tr-1"}) as ids:
        assert ids == [0, 1]
        for index in ids:
            holder = json.loads(holder_path(lock_path(private_lock_dir, "h", index)).read_text())
            assert holder["pid"] == os.getpid() and holder["gpus"] == [0, 1]
            assert (holder["flow_run_id"], holder["task_run_id"]) == ("fr-1", "tr-1")
            assert holder["since"].endswith("Z")
    assert sorted(p.name for p in private_lock_dir.iterdir()) == ["gpu-h-0.lock", "gpu-h-1.lock"]


def test_a_lease_larger_than_the_host_is_refused():
    with pytest.raises(ValueError, match="needs 3 GPUs but this host has 2"):
        with hold_gpus("h", 2, 3):
            pass


def test_a_waiter_sleeps_until_the_release_then_takes_the_gpu_at_once(monkeypatch):
    """One scan before the wait and one after the release: no polling; one message naming the holder."""
    scans = []
    try_group = gpu_locks._try_group
    monkeypatch.setattr(gpu_locks, "_try_group", lambda paths: scans.append(threading.get_ident()) or try_group(paths))
    held, release = threading.Event(), threading.Event()
    messages: list[str] = []
    got: list[float] = []

    def holder() -> None:
        with hold_gpus("h", 1, 1, {"flow_run_id": "the-holder"}):
            held.set()
            release.wait()

    def waiter() -> None:
        with hold_gpus("h", 1, 1, on_wait=messages.append):
            got.append(time.monotonic())

    first = threading.Thread(target=holder)
    first.start()
    held.wait(5)
    second = threading.Thread(target=waiter)
    second.start()
    time.sleep(gpu_locks.QUIET_WAIT_S + 1.5)
    assert not got, "the waiter took a GPU that was held"
    released = time.monotonic()
    release.set()
    second.join(5)
    first.join(5)
    assert got and got[0] - released < 0.5
    waiter_scans = [ident for ident in scans if ident == second.ident]
    assert len(waiter_scans) == 2, f"the waiter scanned {len(waiter_scans)} times: it polls"
    assert len(messages) == 1 and "flow run the-holder" in messages[0] and f"pid {os.getpid()}" in messages[0]


def take_and_release(need: int, got: list, messages: list[str]) -> threading.Thread:
    """A thread that leases `need` GPUs of host h (of 1 or 2), records them and lets go."""

    def run() -> None:
        with hold_gpus("h", max(need, 1), need, on_wait=messages.append) as ids:
            got.append(ids)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_cancelled_wait_takes_nothing():
    cancel = threading.Event()
    failed: list[Exception] = []

    def waiter() -> None:
        try:
            with hold_gpus("h", 1, 1, cancel=cancel):
                pass
        except gpu_locks.LeaseCancelled as exc:
            failed.append(exc)

    with hold_gpus("h", 1, 1):
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.5)
        cancel.set()
        thread.join(5)
        assert not thread.is_alive() and "stopped waiting for 1 GPU of host h" in str(failed[0])


def test_short_contention_logs_nothing():
    messages: list[str] = []
    got: list = []
    with hold_gpus("h", 1, 1):
        waiter = take_and_release(1, got, messages)
        time.sleep(gpu_locks.QUIET_WAIT_S / 4)
    waiter.join(5)
    assert got == [[0]] and messages == []


def test_two_pair_leases_and_a_single_lease_on_four_gpus_neither_deadlock_nor_overlap():
    """Pairs take aligned groups (0-1, 2-3) all or nothing, a single takes any GPU: every requester finishes
    all its rounds, and no GPU is ever held by two at once."""
    intervals: dict[int, list[tuple[float, float, str]]] = {i: [] for i in range(4)}
    guard = threading.Lock()

    def requester(name: str, need: int, rounds: int) -> None:
        for _ in range(rounds):
            with hold_gpus("quad", 4, need, {"flow_run_id": name}) as ids:
                start = time.monotonic()
                time.sleep(0.05)
                end = time.monotonic()
            with guard:
                for index in ids:
                    intervals[index].append((start, end, name))

    threads = [
        threading.Thread(target=requester, args=(name, need, 10))
        for name, need in [
            (
                "pair-a",
                2,
            ),
            ("pair-b", 2),
            ("single", 1),
            ("pair-c", 2),
        ]
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a requester never got its GPUs"
    assert sum(len(v) for v in intervals.values()) == 3 * 10 * 2 + 10
    for index, spans in intervals.items():
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            assert end <= start, f"GPU {index} held by {a} and {b} at once"


HOLDER = """
import sys, time
from qlora_flow.gpu_locks import hold_gpus
with hold_gpus("h", 1, 1, {"flow_run_id": "doomed"}):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_sigkilled_holder_frees_its_gpu_at_once():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        messages: list[str] = []
        got: list = []
        waiter = take_and_release(1, got, messages)
        time.sleep(gpu_locks.QUIET_WAIT_S + 0.5)
        assert not got and len(messages) == 1 and f"pid {child.pid}" in messages[0] and "doomed" in messages[0]
        killed = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        waiter.join(10)
        assert got == [[0]] and time.monotonic() - killed < 10
    finally:
        child.kill()
        child.wait()
