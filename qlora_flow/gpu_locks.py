"""This host's GPUs as OS file locks: one `flock` per GPU, which the kernel releases when its holder dies.

A lease on a GPU of host h is an exclusive `flock` on `<lock dir>/gpu-<h>-<id>.lock`, where <id> names the
physical GPU: its UUID where nvidia-smi answers, else its physical index. Not the index a process sees: a
worker started with CUDA_VISIBLE_DEVICES=1 and one with CUDA_VISIBLE_DEVICES=0 both see "GPU 0", and must
neither wait for each other nor, with overlapping lists, share a GPU. A process that is
SIGKILLed (OOM killer, timeout, node restart) loses its locks at once, so a killed run never keeps a GPU
from the next one. Next to each lock file, `gpu-<h>-<i>.holder.json` names the holder (pid, host, flow
run, task run, since when) while it holds the lock; a waiter reads it to say what it waits for.

Lock directory: env `QLORA_FLOW_GPU_LOCK_DIR`, else `/tmp/qlora-flow-gpu-locks-<uid>`. Every process that
shares this host's GPUs must use the same directory (containers: mount one host directory; several
users: one directory that all of them can write). Lock files are never deleted: two processes locking
two different files of the same name would both think they hold the GPU.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

LOCK_DIR_ENV = "QLORA_FLOW_GPU_LOCK_DIR"
# A GPU that frees up within this long is contention, not a wait worth a log line.
QUIET_WAIT_S = 1.0


class LeaseCancelled(Exception):
    """The caller stopped waiting for GPUs (its flow failed); no GPU was taken."""


def lock_dir() -> Path:
    configured = os.environ.get(LOCK_DIR_ENV)
    return Path(configured) if configured else Path(f"/tmp/qlora-flow-gpu-locks-{os.getuid()}")


def lock_path(directory: Path, host: str, gpu: int | str) -> Path:
    """The lock of one physical GPU (`gpu`: an id from physical_gpu_ids)."""
    return directory / f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', host)}-{re.sub(r'[^A-Za-z0-9._-]', '_', str(gpu))}.lock"


def visible_devices(total: int) -> list[str]:
    """What each GPU index this process sees stands for on the host: the CUDA_VISIBLE_DEVICES entries (physical
    indices or UUIDs) in index order, or "0".."total-1" when the variable is unset."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in listed.split(",") if e.strip()] if listed else []
    # more GPUs than listed only happens with a faked count (QLORA_FLOW_GPUS on a CPU box)
    return entries[:total] + [str(i) for i in range(len(entries), total)]


@lru_cache(maxsize=1)
def _uuids_by_index() -> dict[str, str]:
    """Physical index -> UUID of this host's GPUs, from nvidia-smi (which ignores CUDA_VISIBLE_DEVICES); {} without it."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    pairs = (line.split(",", 1) for line in out.splitlines() if "," in line)
    return {index.strip(): uuid.strip() for index, uuid in pairs}


def physical_gpu_ids(total: int) -> list[str]:
    """Host-wide names of the GPUs this process sees, in index order: the same GPU gets the same name in every
    process, whether its CUDA_VISIBLE_DEVICES names it by index or by (a prefix of) its UUID."""
    uuids = _uuids_by_index()
    named = []
    for entry in visible_devices(total):
        if entry in uuids:
            named.append(uuids[entry])
        else:  # a UUID or the unique UUID prefix CUDA accepts; an index when nvidia-smi is not there
            matches = [u for u in uuids.values() if u.startswith(entry)]
            named.append(matches[0] if len(matches) == 1 else entry)
    return named


def holder_path(lock: Path) -> Path:
    return lock.with_suffix(".holder.json")


def aligned_groups(total: int, need: int) -> list[list[int]]:
    """Groups of `need` GPUs that a lease may take: 0-1, 2-3, ... for two, so two multi-GPU leases
    never each hold half of the GPUs the other one needs."""
    if need > total:
        raise ValueError(f"a task needs {need} GPUs but this host has {total}")
    return [list(range(start, start + need)) for start in range(0, total - need + 1, need)]


def read_holder(lock: Path) -> dict | None:
    try:
        return json.loads(holder_path(lock).read_text())
    except (OSError, ValueError):
        return None  # released meanwhile, or the holder has not written it yet


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "a process that has not said who it is"
    parts = [f"pid {holder.get('pid')} on {holder.get('host')}"]
    if holder.get("flow_run_id"):
        name = f" '{holder['flow_run_name']}'" if holder.get("flow_run_name") else ""
        parts.append(f"flow run{name} {holder['flow_run_id']}")
    if holder.get("task_run_id"):
        parts.append(f"task run {holder['task_run_id']}")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


def _open(path: Path) -> int:
    # 0o666 (less the umask): several users may share one lock directory
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive lock on `path`, or None if another open file holds it."""
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            os.utime(fd)  # a recent mtime keeps /tmp cleaners (systemd-tmpfiles ages by time) off it
            return fd
        os.close(fd)  # the file was removed or replaced between open and lock: lock the current one


def _try_group(paths: list[Path]) -> tuple[list[int], Path | None]:
    """All locks of one group, or none of them and the first busy path: never waits while holding a lock,
    so leases of different sizes cannot deadlock."""
    fds: list[int] = []
    for path in paths:
        fd = _try_lock(path)
        if fd is None:
            for taken in fds:
                os.close(taken)
            return [], path
        fds.append(fd)
    return fds, None


class _ReleaseWatch:
    """Wakes the waiter when any watched lock is released, without polling: one thread per busy lock blocks
    in `flock(LOCK_SH)`, which the kernel grants when the exclusive holder unlocks or dies, lets go at once,
    and signals. A watcher whose lock is still held when the lease is taken stays blocked until it frees."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self._threads: dict[Path, threading.Thread] = {}

    def watch(self, path: Path) -> None:
        thread = self._threads.get(path)
        if thread is not None and thread.is_alive():
            return
        thread = threading.Thread(target=self._wait_released, args=(path,), name=f"watch-{path.name}", daemon=True)
        self._threads[path] = thread
        thread.start()

    def _wait_released(self, path: Path) -> None:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)  # also unlocks
        self.released.set()


def _write_holder(lock: Path, holder: dict) -> None:
    target = holder_path(lock)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(holder))
    os.replace(tmp, target)  # readers see the old or the new file, never half of one


@contextmanager
def hold_gpus(
    host: str,
    total: int,
    need: int,
    holder: dict | None = None,
    on_wait: Callable[[str], None] = lambda message: None,
    cancel: threading.Event | None = None,
) -> Iterator[list[int]]:
    """Hold `need` GPUs of `host` (an aligned group) until the block ends; blocks until a group is free.

    `holder` (flow_run_id, task_run_id, ...) is written next to the locks, with pid, host and start time.
    If no group frees up within QUIET_WAIT_S, `on_wait` gets one message naming what holds the GPUs.
    Setting `cancel` ends the wait with LeaseCancelled."""
    groups = aligned_groups(total, need)
    directory = lock_dir()
    gpu_ids = physical_gpu_ids(total)
    paths = [lock_path(directory, host, gpu) for gpu in gpu_ids]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path in paths:
            os.close(_open(path))
    except OSError as exc:
        raise OSError(
            f"cannot create GPU lock files in {directory} ({exc.strerror}): set {LOCK_DIR_ENV} to a directory "
            "that every process using this host's GPUs can write"
        ) from exc
    watch = _ReleaseWatch()
    if cancel is not None:

        def wake_on_cancel() -> None:
            cancel.wait()
            watch.released.set()

        threading.Thread(target=wake_on_cancel, name="gpu-lease-cancel", daemon=True).start()
    started = time.monotonic()
    announced = False
    while True:
        watch.released.clear()  # before the checks: a release or cancel during them still wakes the wait below
        if cancel is not None and cancel.is_set():
            raise LeaseCancelled(f"stopped waiting for {need} GPU{'s' if need > 1 else ''} of host {host}")
        busy: list[Path] = []
        for ids in groups:
            fds, busy_path = _try_group([paths[i] for i in ids])
            if fds:
                break
            busy.append(busy_path)
        else:
            for path in busy:
                watch.watch(path)
            if not announced and not watch.released.wait(max(0.0, QUIET_WAIT_S - (time.monotonic() - started))):
                announced = True
                on_wait(_waiting_message(host, need, {path: gpu_ids[paths.index(path)] for path in busy}))
            watch.released.wait()
            continue
        break
    record = {
        **(holder or {}),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpus": ids,
    }
    locked = [paths[i] for i in ids]
    try:
        for path in locked:
            _write_holder(path, record)
        yield ids
    finally:
        for path in locked:
            holder_path(path).unlink(missing_ok=True)  # before unlocking: the next holder writes its own
        for fd in fds:
            os.close(fd)


def _waiting_message(host: str, need: int, busy: dict[Path, str]) -> str:
    holders: dict[str, list[str]] = {}
    for path, gpu in busy.items():
        holders.setdefault(describe_holder(read_holder(path)), []).append(gpu)
    held = "; ".join(f"GPU {','.join(ids)} held by {who}" for who, ids in holders.items())
    return (
        f"waiting for {need} GPU{'s' if need > 1 else ''} of host {host}: {held} "
        f"(lock files in {next(iter(busy)).parent}); this run starts when one is released"
    )
