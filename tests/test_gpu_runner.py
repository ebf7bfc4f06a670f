"""GpuTaskRunner on a CPU box with a faked GPU count: each GPU task gets its own GPUs, never shared."""

from __future__ import annotations

import os
import sys
import time
from itertools import combinations

import gpu_env_probe
import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client

from qlora_flow.config import PipelineConfig
from qlora_flow.gpu_locks import LOCK_DIR_ENV
from qlora_flow.gpu_runner import (
    GPU_COUNT_ENV,
    LEASED_GPU_ENV,
    GpuTaskRunner,
    gpu_lease,
    gpus_needed,
    host_gpu_count,
    slot_name,
    use_leased_gpu,
)


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path, monkeypatch):
    """Each test its own GPU locks; pool processes inherit the variable."""
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))


@task(tags=["gpu"])
def hold_gpu(seconds: float) -> tuple[str, float, float]:
    started = time.time()
    time.sleep(seconds)
    # the index use_leased_gpu makes current: CUDA starts after the variable is set, the first leased GPU is 0
    assert os.environ[LEASED_GPU_ENV] == "0"
    return os.environ["CUDA_VISIBLE_DEVICES"], started, time.time()


@task
def cpu_only() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


@flow(task_runner=GpuTaskRunner(gpus=2, host="test-host"))
def four_on_two() -> tuple[list[tuple[str, float, float]], str]:
    futures = [hold_gpu.submit(2.0) for _ in range(4)]
    cpu = cpu_only.submit()
    return [f.result() for f in futures], cpu.result()


def test_gpu_tasks_get_distinct_gpus_and_never_overlap():
    runs, cpu_devices = four_on_two()
    assert {devices for devices, _, _ in runs} <= {"0", "1"}
    for (d1, s1, e1), (d2, s2, e2) in combinations(runs, 2):
        if d1 == d2:
            assert e1 <= s2 or e2 <= s1, f"two tasks shared GPU {d1} at the same time"
    # two GPUs: the four tasks ran two at a time, not one after another
    assert any(s2 < e1 and s1 < e2 for (_, s1, e1), (_, s2, e2) in combinations(runs, 2))
    assert cpu_devices == "", "tasks without the gpu tag must not see any GPU"


@task(tags=["gpu"])
def first_cuda_use(cfg: PipelineConfig) -> tuple[int, str, str, str]:
    """(pid, this task's GPUs, the GPUs a CUDA init would see, those its module's import saw): CUDA reads
    the variable once per process, and importing a task's module (peft) may already initialise it."""
    devices = os.environ["CUDA_VISIBLE_DEVICES"]
    return os.getpid(), devices, sys.__dict__.setdefault("fake_cuda_devices", devices), gpu_env_probe.DEVICES_AT_IMPORT


@flow(task_runner=GpuTaskRunner(gpus=2, host="fresh-host", max_workers=1))
def two_in_a_row() -> list[tuple[int, str, str, str]]:
    pair, one = (PipelineConfig.model_validate({"execution": {"gpus": n}}) for n in (2, 1))
    return [first_cuda_use.submit(pair).result(), first_cuda_use.submit(one).result()]


def test_each_gpu_task_starts_cuda_in_a_fresh_process_that_sees_only_its_gpus():
    (pid1, devices1, seen1, imported1), (pid2, devices2, seen2, imported2) = two_in_a_row()
    assert (devices1, devices2) == ("0,1", "0")
    assert pid1 != pid2 and (seen1, seen2) == (devices1, devices2), "the second task saw the first one's GPUs"
    assert (imported1, imported2) == (devices1, devices2), "the task's module was imported before its GPUs were set"


def test_gpus_needed_reads_tag_and_config():
    cfg = PipelineConfig.model_validate({"execution": {"gpus": 2}})
    assert gpus_needed(["gpu"], {"cfg": cfg}) == 2
    assert gpus_needed(["gpu"], {"x": 1}) == 1
    assert gpus_needed([], {"cfg": cfg}) == 0


def test_host_gpu_count_env_overrides_config(monkeypatch):
    monkeypatch.setenv(GPU_COUNT_ENV, "3")
    assert host_gpu_count(PipelineConfig().execution) == 3
    monkeypatch.delenv(GPU_COUNT_ENV)
    assert host_gpu_count(PipelineConfig.model_validate({"execution": {"host_gpus": 5}}).execution) == 5


def shown_slots(host: str, total: int) -> list[int]:
    """Active slots of the GPUs' global concurrency limits, as the Prefect UI's Concurrency page shows them."""
    with get_client(sync_client=True) as client:
        return [client.read_global_concurrency_limit_by_name(slot_name(host, i)).active_slots for i in range(total)]


@flow
def nested_leases() -> tuple[list[int], list[int], list[int], list[int]]:
    with gpu_lease("pair-host", 4, 2) as first, gpu_lease("pair-host", 4, 2) as second:
        while_held = shown_slots("pair-host", 4)
    return first, second, while_held, shown_slots("pair-host", 4)


def test_multi_gpu_leases_take_whole_aligned_groups_and_show_in_the_ui():
    first, second, while_held, after = nested_leases()
    assert sorted([first, second]) == [[0, 1], [2, 3]]
    assert (while_held, after) == ([1, 1, 1, 1], [0, 0, 0, 0])


def test_lease_larger_than_host_is_refused():
    with pytest.raises(ValueError, match="needs 3 GPUs but this host has 2"):
        with gpu_lease("h", 2, 3):
            pass


@pytest.mark.slow
def test_sweep_trains_ranks_side_by_side_on_distinct_gpus(tiny_config, monkeypatch):
    from flows.sweep import lora_sweep

    monkeypatch.setenv(GPU_COUNT_ENV, "2")
    points = lora_sweep(tiny_config, [2, 4])

    assert sorted(p.rank for p in points) == [2, 4]
    assert sorted(p.cuda_visible_devices for p in points) == ["0", "1"]
    assert len({p.adapter_uri for p in points}) == 2
    first, second = points
    assert first.started < second.finished and second.started < first.finished, "the two trainings overlapped"
    assert first.eval_loss <= second.eval_loss, "sorted best first"


def test_pipeline_runs_on_one_host_take_turns_on_its_gpus_through_the_same_leases(monkeypatch):
    """flow_gpu_lease, as the pipeline flow holds it: two runs on a 1-GPU host never hold the GPU together,
    each sees only the leased GPU, and the variable is restored afterwards."""
    import socket
    from threading import Thread

    from qlora_flow.gpu_runner import flow_gpu_lease

    monkeypatch.setenv(GPU_COUNT_ENV, "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    execution = PipelineConfig().execution
    holds: list[tuple[list[int], str, float, float]] = []

    def pipeline_run() -> None:
        with flow_gpu_lease(execution, "cuda") as ids:
            started, devices = time.time(), os.environ["CUDA_VISIBLE_DEVICES"]
            time.sleep(1.0)
            holds.append((ids, devices, started, time.time()))

    runs = [Thread(target=pipeline_run) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=60)
    assert [(ids, devices) for ids, devices, _, _ in holds] == [([0], "0"), ([0], "0")]
    (_, _, s1, e1), (_, _, s2, e2) = holds
    assert e1 <= s2 or e2 <= s1, "two pipeline runs held the same GPU at once"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ

    # a worker already limited to GPUs 5 and 7, with CUDA initialised (as importing peft does): children get
    # the physical id, in-process stages the current device, an index into what the process sees
    import torch

    current = [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: current.__setitem__(0, index))
    monkeypatch.setenv(GPU_COUNT_ENV, "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    host = socket.gethostname()
    with gpu_lease(host, 2, 1) as taken:  # another run holds the first of the two
        with flow_gpu_lease(execution, "cuda") as ids:
            assert (taken, ids) == ([0], [1])
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "7" and current[0] == 1
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7" and current[0] == 0
    # CPU runs take no lease
    with flow_gpu_lease(execution, "cpu") as ids:
        assert ids is None and os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"


def test_a_gpu_task_makes_its_leased_gpu_current_for_in_process_cuda(monkeypatch):
    import torch

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv(LEASED_GPU_ENV, raising=False)
    assert use_leased_gpu() is None and current == []  # not a GpuTaskRunner task: nothing to do
    monkeypatch.setenv(LEASED_GPU_ENV, "1")
    assert use_leased_gpu() == 1 and current == [1]


@task(tags=["gpu"])
def devices_and_shown_slots() -> tuple[str, list[int]]:
    return os.environ["CUDA_VISIBLE_DEVICES"], shown_slots("busy-host", 1)


@flow(task_runner=GpuTaskRunner(gpus=1, host="busy-host"))
def one_gpu_task() -> tuple[str, list[int]]:
    return devices_and_shown_slots.submit().result()


def test_a_gpu_task_waits_for_a_held_gpu_with_one_info_line_naming_the_holder(prefect_api, caplog):
    """On a server set with temporary settings (as tests and `deployments.local` do): the lease shows there."""
    import logging
    import threading

    from qlora_flow.gpu_locks import hold_gpus

    held = threading.Event()

    def other_run() -> None:
        """Holds the GPU until the task has waited a while (the test reads the log, the lease does not)."""
        with hold_gpus("busy-host", 1, 1, {"flow_run_id": "the-other-run"}):
            held.set()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any("waiting for" in r.getMessage() for r in caplog.records):
                time.sleep(0.1)
            time.sleep(2.0)

    holder = threading.Thread(target=other_run)
    holder.start()
    held.wait(5)
    with caplog.at_level(logging.INFO):
        assert one_gpu_task() == ("0", [1])
    holder.join(5)
    waiting = [r for r in caplog.records if "waiting for 1 GPU of host busy-host" in r.getMessage()]
    assert len(waiting) == 1 and waiting[0].levelno == logging.INFO
    assert "flow run the-other-run" in waiting[0].getMessage() and f"pid {os.getpid()}" in waiting[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@task(tags=["gpu"])
def never_gets_its_gpu() -> None:
    raise AssertionError("ran on a GPU that another run holds")


WAITING: list = []  # a flow's parameters are copies


@flow
def fails_while_a_task_waits_for_a_gpu() -> None:
    with GpuTaskRunner(gpus=1, host="held-host") as runner:
        WAITING.append(runner.submit(never_gets_its_gpu, {}))
        time.sleep(2.0)  # the task is waiting for the GPU now
        raise RuntimeError("a sibling task failed")


def test_a_failing_flow_stops_waiting_for_gpus():
    """The sweep's runner block exits on an error without waiting for GPUs that another run holds."""
    from qlora_flow.gpu_locks import LeaseCancelled, hold_gpus

    with hold_gpus("held-host", 1, 1):
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="a sibling task failed"):
            fails_while_a_task_waits_for_a_gpu()
        assert time.monotonic() - started < 60
        with pytest.raises(LeaseCancelled, match="stopped waiting for 1 GPU of host held-host"):
            WAITING.pop().result(timeout=5)
