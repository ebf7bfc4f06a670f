"""Task runners that hand GPUs to GPU tasks: this host's GPUs through a process pool, or a Ray cluster.

On one host, `GpuTaskRunner` runs each task in a pool process. Before a task tagged `gpu` starts,
it takes a lease on as many GPUs as the task needs from Prefect global concurrency limits, one
limit of size 1 per GPU (`gpu:<host>:<index>`), and runs the task with CUDA_VISIBLE_DEVICES set
to exactly those GPUs. Because the leases live on the Prefect server, two flow runs on the same
host never share a GPU either. The training child process (tasks/train.py) inherits the variable.

Beyond one host, `gpu_task_runner` returns prefect-ray's `RayTaskRunner` and `gpu_request` asks
Ray for `num_gpus` (or a custom resource); Ray places the task and sets CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.context import SettingsContext
from prefect.settings import get_current_settings
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from qlora_flow.config import ExecutionConfig, PipelineConfig

GPU_TAG = "gpu"
# The first GPU a GpuTaskRunner task leased, as an index into what its process sees (see use_leased_gpu).
LEASED_GPU_ENV = "QLORA_FLOW_LEASED_GPU"
# Set in tests and on CPU boxes to pretend the host has this many GPUs.
GPU_COUNT_ENV = "QLORA_FLOW_GPUS"


def host_gpu_count(execution: ExecutionConfig) -> int:
    if GPU_COUNT_ENV in os.environ:
        return int(os.environ[GPU_COUNT_ENV])
    if execution.host_gpus is not None:
        return execution.host_gpus
    import torch

    return torch.cuda.device_count()


def slot_name(host: str, index: int) -> str:
    return f"gpu:{host}:{index}"


def gpus_needed(task_tags: Iterable[str], parameters: dict[str, Any]) -> int:
    """GPUs one task needs: none unless tagged `gpu`; else execution.gpus of its PipelineConfig (default 1)."""
    if GPU_TAG not in set(task_tags):
        return 0
    for value in parameters.values():
        if isinstance(value, PipelineConfig):
            return max(value.execution.gpus, 1)
    return 1


def ensure_gpu_slots(host: str, total: int) -> None:
    with get_client(sync_client=True) as client:
        for index in range(total):
            client.upsert_global_concurrency_limit_by_name(slot_name(host, index), limit=1)


@contextmanager
def gpu_lease(host: str, total: int, need: int, poll_seconds: float = 1.0) -> Iterator[list[int]]:
    """Hold `need` GPUs of this host until the block ends; waits until a whole group is free.

    Groups are aligned (0-1, 2-3, ... for two GPUs), and all slots of a group are taken in one
    request, so two multi-GPU tasks can never each hold half of what the other needs.
    """
    if need > total:
        raise ValueError(f"a task needs {need} GPUs but this host has {total}")
    groups = [list(range(start, start + need)) for start in range(0, total - need + 1, need)]
    while True:
        for ids in groups:
            stack = ExitStack()
            try:
                stack.enter_context(
                    concurrency([slot_name(host, i) for i in ids], occupy=1, max_retries=0, strict=True)
                )
            except ConcurrencySlotAcquisitionError:
                continue  # taken by another task; try the next group
            with stack:
                yield ids
            return
        time.sleep(poll_seconds)


def ephemeral_api_env() -> dict[str, str]:
    """Without a configured server, point pool processes at this process's ephemeral API server.

    Otherwise each pool process would start an ephemeral server of its own, and GPU leases and
    task runs would land in different databases.
    """
    if get_current_settings().api.url:
        return {}
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the per-process singleton that the ephemeral client uses
    server.start()
    return {"PREFECT_API_URL": server.api_url}


class GpuTaskRunner(ProcessPoolTaskRunner):
    """Process-pool runner: one pool process per GPU task, pinned to the GPUs it leased."""

    def __init__(self, gpus: int, host: str | None = None, max_workers: int | None = None):
        super().__init__(max_workers=max_workers or max(gpus, 1))
        self.gpus = gpus
        self.host = host or socket.gethostname()

    def duplicate(self) -> GpuTaskRunner:
        return type(self)(self.gpus, self.host, self._max_workers)

    def __enter__(self) -> GpuTaskRunner:
        super().__enter__()
        # One task per (spawned) worker: a reused worker would keep its earlier task's CUDA context and cached
        # memory on a GPU whose lease has passed to another task. Prefect has no option for it; its pool is
        # rebuilt with the same settings plus max_tasks_per_child.
        pool = self._executor
        self._executor = ProcessPoolExecutor(
            pool._max_workers, pool._mp_context, pool._initializer, pool._initargs, max_tasks_per_child=1
        )
        pool.shutdown()  # never used: its processes start on the first submit
        self._api_env = ephemeral_api_env()
        ensure_gpu_slots(self.host, self.gpus)
        return self

    def _resolve_futures_and_submit(
        self,
        task: Any,
        task_run_id: uuid.UUID,
        parameters: dict[str, Any],
        wait_for: Iterable[Any] | None,
        dependencies: Any,
        context: dict[str, Any],
        env: dict[str, str],
    ) -> Future[bytes]:
        # Runs in a resolver thread, so blocking here waits for GPUs without blocking the flow.
        wait_for = list(wait_for or [])
        wait(wait_for)  # upstream work first: a task must not hold GPUs while it waits for inputs
        need = gpus_needed(task.tags, parameters)
        env = {**env, **self._api_env}
        args = dict(task=task, task_run_id=task_run_id, parameters=parameters, wait_for=wait_for,
                    dependencies=dependencies, context=context)  # fmt: skip
        if need == 0:
            return super()._resolve_futures_and_submit(**args, env={**env, "CUDA_VISIBLE_DEVICES": ""})
        settings = context.get("settings_context")
        with SettingsContext(**settings) if settings else nullcontext():
            with gpu_lease(self.host, self.gpus, need) as ids:
                pinned = {**env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, ids)), LEASED_GPU_ENV: str(ids[0])}
                future = super()._resolve_futures_and_submit(**args, env=pinned)
                wait([future])  # the lease lasts exactly as long as the task
        return future


def use_leased_gpu() -> int | None:
    """First thing in a GpuTaskRunner task that uses CUDA in-process: make its first leased GPU current.

    Prefect applies the task's environment only after unpickling the task, and importing the task's
    module imports peft, whose bitsandbytes initialises CUDA: the process already sees every GPU, so
    CUDA_VISIBLE_DEVICES only reaches child processes (training). Returns the device index set."""
    import torch

    index = os.environ.get(LEASED_GPU_ENV)
    if index is None or not torch.cuda.is_available():
        return None
    torch.cuda.set_device(int(index))
    return int(index)


@contextmanager
def flow_gpu_lease(execution: ExecutionConfig, device: str) -> Iterator[list[int] | None]:
    """The pipeline's GPU stages run in the flow run's own process: hold `execution.gpus` GPUs of this host,
    from the same `gpu:<host>:<i>` leases as GpuTaskRunner, for the block, so two flow runs on one host (a
    manual run during a scheduled one, a sweep) never share a GPU. No lease on CPUs or on Ray, which
    places its own tasks.

    Importing peft (through bitsandbytes) has already initialised CUDA in this process, which fixes the
    devices the process sees; so in-process stages follow the current device (set to the first leased
    GPU), and CUDA_VISIBLE_DEVICES, set to the leased GPUs, reaches child processes (training, torchrun)."""
    import torch

    total = host_gpu_count(execution) if device == "cuda" and execution.runner != "ray" else 0
    if total == 0:
        yield None
        return
    host = socket.gethostname()
    ensure_gpu_slots(host, total)
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = previous.split(",") if previous else [str(i) for i in range(total)]
    in_process = torch.cuda.is_available()  # initialises CUDA now if nothing did: the indices below are in `visible`
    with gpu_lease(host, total, max(execution.gpus, 1)) as ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] for i in ids)
        previous_device = torch.cuda.current_device() if in_process else None
        if in_process:
            torch.cuda.set_device(ids[0])
        try:
            yield ids
        finally:
            if previous_device is not None:
                torch.cuda.set_device(previous_device)
            if previous is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = previous


def gpu_task_runner(execution: ExecutionConfig) -> TaskRunner:
    """The runner for GPU stages that the config selects."""
    if execution.runner == "ray":
        from prefect_ray import RayTaskRunner

        init_kwargs: dict[str, Any] = {}
        if execution.ray_address is None:
            # A local Ray instance; a custom GPU resource (CPU tests) must be declared to exist.
            init_kwargs = {"include_dashboard": False}
            if execution.ray_gpu_resource != "GPU":
                init_kwargs["resources"] = {execution.ray_gpu_resource: float(host_gpu_count(execution))}
        return RayTaskRunner(address=execution.ray_address, init_kwargs=init_kwargs)
    return GpuTaskRunner(gpus=host_gpu_count(execution))


@contextmanager
def gpu_request(execution: ExecutionConfig, gpus: int) -> Iterator[None]:
    """Around `runner.submit(...)`: tells Ray how many GPUs the task needs (the local runner reads the tag)."""
    if execution.runner != "ray":
        yield
        return
    from prefect_ray.context import remote_options

    if execution.ray_gpu_resource == "GPU":
        options: dict[str, Any] = {"num_gpus": gpus}
    else:
        options = {"num_gpus": 0, "resources": {execution.ray_gpu_resource: gpus}}
    with remote_options(**options):
        yield
