"""Task runners that hand GPUs to GPU tasks: this host's GPUs through a process pool, or a Ray cluster.

On one host, `GpuTaskRunner` runs each task in a fresh spawned process. Before a task tagged `gpu` starts,
it leases as many GPUs as the task needs (`gpu_lease`: OS file locks, see qlora_flow.gpu_locks), and
runs the task with CUDA_VISIBLE_DEVICES set to exactly those GPUs. The locks are per host and the
kernel drops them when their holder dies, so two flow runs on the same host never share a GPU and a
killed run never keeps one. The training child process (tasks/train.py) inherits the variable.
While a GPU is leased, its Prefect global concurrency limit `gpu:<host>:<index>` shows one active
slot (the UI's Concurrency page); it is only a display, the OS lock decides.

Beyond one host, `gpu_task_runner` returns prefect-ray's `RayTaskRunner` and `gpu_request` asks
Ray for `num_gpus` (or a custom resource); Ray places the task and sets CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import socket
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import copy_context
from typing import Any

import cloudpickle
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.context import FlowRunContext, TaskRunContext, hydrated_context, serialize_context
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound
from prefect.futures import PrefectConcurrentFuture, PrefectFuture, wait
from prefect.logging import get_logger, get_run_logger
from prefect.settings import get_current_settings
from prefect.task_runners import TaskRunner
from prefect.utilities.engine import resolve_inputs_sync

from qlora_flow.config import ExecutionConfig, PipelineConfig
from qlora_flow.gpu_locks import hold_gpus, visible_devices

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


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("qlora_flow.gpu")


def current_run_ids() -> dict[str, str | None]:
    """The flow run (and task run) of the calling code, as written into a GPU lock's holder file."""
    flow_run = FlowRunContext.get()
    task_run = TaskRunContext.get()
    return {
        "flow_run_id": str(flow_run.flow_run.id) if flow_run and flow_run.flow_run else None,
        "flow_run_name": flow_run.flow_run.name if flow_run and flow_run.flow_run else None,
        "task_run_id": str(task_run.task_run.id) if task_run else None,
    }


def show_lease(host: str, ids: list[int], held: bool, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Show GPUs as taken (one active slot of `gpu:<host>:<i>`, limit 1) or free in the Prefect UI.

    Written by the holder of the OS lock, after taking it and before releasing it, so the display follows
    the locks; a killed holder's stale 1 is overwritten by the next holder and never blocks anyone."""
    slots = int(held)
    try:
        with get_client(sync_client=True) as client:
            for index in ids:
                name = slot_name(host, index)
                try:
                    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=slots))
                except ObjectNotFound:
                    try:
                        client.create_global_concurrency_limit(
                            GlobalConcurrencyLimitCreate(name=name, limit=1, active_slots=slots)
                        )
                    except ObjectAlreadyExists:  # created by another holder meanwhile
                        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=slots))
    except Exception as exc:  # the display must never cost a run its GPUs
        logger.warning("GPU lease of %s not shown in the Prefect UI (%s: %s)", ids, type(exc).__name__, exc)


@contextmanager
def gpu_lease(
    host: str,
    total: int,
    need: int,
    holder: dict[str, str | None] | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[list[int]]:
    """Hold `need` GPUs of this host (an aligned group, see gpu_locks.aligned_groups) until the block ends.

    Blocks until a group is free (or `cancel` is set: LeaseCancelled); if that takes a while, logs one INFO
    line naming the holder. `holder` (flow_run_id, flow_run_name, task_run_id) defaults to the calling run."""
    logger = logger or _logger()
    with hold_gpus(host, total, need, holder or current_run_ids(), on_wait=logger.info, cancel=cancel) as ids:
        show_lease(host, ids, True, logger)
        try:
            yield ids
        finally:
            show_lease(host, ids, False, logger)


def ephemeral_api_env() -> dict[str, str]:
    """Without a configured server, point pool processes at this process's ephemeral API server.

    Otherwise each pool process would start an ephemeral server of its own.
    """
    if get_current_settings().api.url:
        return {}
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the per-process singleton that the ephemeral client uses
    server.start()
    return {"PREFECT_API_URL": server.api_url}


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _run_in_fresh_process(env: dict[str, str], call: bytes) -> bytes:
    """A GpuTaskRunner task in its own process; returns its final state, pickled."""
    # The task's environment first, its unpickling second: importing the task's module (peft, bitsandbytes)
    # may initialise CUDA, which reads CUDA_VISIBLE_DEVICES once. A main module re-imported by the spawn
    # start method may have done so already; then the process sees every GPU and the leased index stays.
    if not _cuda_initialised() and LEASED_GPU_ENV in env:
        env = {**env, LEASED_GPU_ENV: "0"}
    os.environ.update(env)
    kwargs = cloudpickle.loads(call)
    from prefect.task_engine import run_task_async, run_task_sync

    with hydrated_context(kwargs.pop("context")):
        if kwargs["task"].isasync:
            state = asyncio.run(run_task_async(**kwargs))
        else:
            state = run_task_sync(**kwargs)
    return cloudpickle.dumps(state)


class GpuTaskRunner(TaskRunner[PrefectConcurrentFuture[Any]]):
    """Runs each task in a fresh spawned process; a task tagged `gpu` first leases its GPUs and sees only them.

    Built on Prefect's public TaskRunner interface. One task per process, because a reused process would
    keep its earlier task's CUDA context and cached memory on a GPU whose lease has passed to another
    task; at most `max_workers` such processes at a time."""

    def __init__(self, gpus: int, host: str | None = None, max_workers: int | None = None):
        super().__init__()
        self.gpus = gpus
        self.host = host or socket.gethostname()
        self.max_workers = max_workers or max(gpus, 1)
        self._waiters: ThreadPoolExecutor | None = None
        self._process_slots: threading.BoundedSemaphore | None = None
        self._stop_waiting: threading.Event | None = None
        self._api_env: dict[str, str] | None = None

    def duplicate(self) -> GpuTaskRunner:
        return type(self)(self.gpus, self.host, self.max_workers)

    def __enter__(self) -> GpuTaskRunner:
        super().__enter__()
        # one thread per submitted task while it waits for its inputs, its GPUs and its process (made as needed)
        self._waiters = ThreadPoolExecutor(max_workers=256, thread_name_prefix="gpu-task")
        self._process_slots = threading.BoundedSemaphore(self.max_workers)
        self._stop_waiting = threading.Event()
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        if self._waiters is not None:
            if exc_type is not None:
                self._stop_waiting.set()  # a failing flow does not wait for GPUs for tasks whose results it drops
            self._waiters.shutdown(wait=True, cancel_futures=True)
            self._stop_waiting.set()  # ends the threads that watched for it
        self._waiters = self._process_slots = self._stop_waiting = self._api_env = None
        super().__exit__(exc_type, *exc_info)

    def submit(
        self,
        task: Any,
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectFuture[Any]] | None = None,
        dependencies: dict[str, Any] | None = None,
    ) -> PrefectConcurrentFuture[Any]:
        if self._waiters is None:
            raise RuntimeError("Task runner is not started")
        if self._api_env is None:
            # at the first task, not on entry: a task's process rebuilding its flow's context enters a
            # duplicate of this runner that never runs anything
            self._api_env = ephemeral_api_env()
        task_run_id = uuid.uuid4()
        flow_run = FlowRunContext.get()
        holder = {**current_run_ids(), "task_run_id": str(task_run_id)}
        env = {**get_current_settings().to_environment_variables(exclude_unset=True), **os.environ, **self._api_env}
        # in the submitter's context: its settings (a temporary API URL) reach the lease's Prefect client
        future = self._waiters.submit(
            copy_context().run,
            self._run,
            task,
            task_run_id,
            parameters,
            list(wait_for or []),
            dependencies,
            serialize_context(),
            env,
            holder,
            get_run_logger(flow_run) if flow_run else self.logger,
        )
        return PrefectConcurrentFuture(task_run_id=task_run_id, wrapped_future=future)

    def _run(
        self,
        task: Any,
        task_run_id: uuid.UUID,
        parameters: dict[str, Any],
        wait_for: list[PrefectFuture[Any]],
        dependencies: dict[str, Any] | None,
        context: dict[str, Any],
        env: dict[str, str],
        holder: dict[str, str | None],
        logger: logging.Logger | logging.LoggerAdapter,
    ) -> Any:
        """In a waiter thread: upstream work first (a task must not hold GPUs while it waits for inputs),
        then the GPUs, then the task in a fresh process; the lease lasts exactly as long as the task."""
        wait(wait_for)
        parameters = resolve_inputs_sync(parameters, return_data=True, max_depth=-1)
        call = cloudpickle.dumps(
            dict(
                task=task,
                task_run_id=task_run_id,
                parameters=parameters,
                wait_for=[f.state for f in wait_for] or None,
                return_type="state",
                dependencies=dependencies,
                context=context,
            )
        )
        need = gpus_needed(task.tags, parameters)
        if need == 0:
            return self._in_process({**env, "CUDA_VISIBLE_DEVICES": ""}, call)
        with gpu_lease(self.host, self.gpus, need, holder, logger, self._stop_waiting) as ids:
            # the leased indices as this process sees them, named as CUDA_VISIBLE_DEVICES named them here: under
            # CUDA_VISIBLE_DEVICES=2,3 index 0 is GPU 2, not the host's GPU 0
            visible = visible_devices(self.gpus)
            pinned = {**env, "CUDA_VISIBLE_DEVICES": ",".join(visible[i] for i in ids), LEASED_GPU_ENV: str(ids[0])}
            return self._in_process(pinned, call)

    def _in_process(self, env: dict[str, str], call: bytes) -> Any:
        """The task in a process of its own: a one-process pool per task, since a shared pool with
        max_tasks_per_child=1 spawns an idle replacement (imports and all) after every task."""
        with self._process_slots, ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as one:
            return cloudpickle.loads(one.submit(_run_in_fresh_process, env, call).result())


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
    from the same per-host GPU locks as GpuTaskRunner, for the block, so two flow runs on one host (a
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
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = visible_devices(total)
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
