"""Stage 3: LoRA training on the NF4 base, resumable and content-addressed.

The training itself is the backend that `training.backend` names (qlora_flow/training_backends.py; the default
is the TRL recipe in qlora_flow/recipe.py: local files in, adapter and statistics out). This module is the stage
around it: the fingerprint, the store (inputs, checkpoints, the adapter), the child process, the per-adapter lock
and the Prefect task.

Where things live in the store (fp = training fingerprint):
    cache/adapter/<fp>/checkpoints/checkpoint-<step>/   adapter, optimizer, scheduler, RNG, trainer state;
                                                        `_COMPLETE` is written after all of it
    cache/adapter/<fp>/adapter/                          the final adapter + tokenizer + adapter_ref.json

The fingerprint covers the data, the base model, the LoRA and training settings that change the
result, the backend's code (not this module's) and the library versions; an identical request returns the stored adapter, and a
run that died resumes from the newest complete checkpoint. An adapter (or checkpoint) stored under the fingerprint of
earlier code declared equivalent in qlora_flow/code_lineage.py is used as well.

GPU work runs in a child process (`python -m tasks.train SPEC RESULT`) so that a timeout or a
cancellation kills it and frees the device, and its log lines stream into the Prefect run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from qlora_flow.artifacts import TrainingProgressArtifact
from qlora_flow.code_lineage import code_hashes, find_result, training_modules
from qlora_flow.config import PipelineConfig
from qlora_flow.errors import is_retryable, one_line
from qlora_flow.fingerprint import combine, library_versions
from qlora_flow.layout import ADAPTER_REF_NAME, adapter_checkpoints_key, adapter_key, trained_adapter_key
from qlora_flow.lifeline import PARENT_PID_ENV, exit_with_parent
from qlora_flow.recipe import RecipeInputs, make_plan, prepare_device
from qlora_flow.refs import AdapterRef, PreparedBase, ValidatedDataset
from qlora_flow.stage_cache import recipe_fingerprint
from qlora_flow.store import COMPLETE_MARKER, ArtifactStore, open_store
from qlora_flow.training_backends import training_backend
from qlora_flow.training_plan import resolve_packing

log = logging.getLogger(__name__)

PROGRESS_PREFIX = "QLORA_FLOW_PROGRESS "


def training_fingerprints(cfg: PipelineConfig, data: ValidatedDataset, base: PreparedBase) -> list[str]:
    """Today's adapter fingerprint first, then those that earlier code of the default backend declared equivalent
    computed (qlora_flow.code_lineage "training")."""
    # `packing: auto` packs on GPUs only, and a packed row holds several examples: resolved, it names the recipe.
    packed = resolve_packing(cfg.training.packing, base.device)
    recipe, libraries = recipe_fingerprint(cfg), library_versions()
    return [
        combine("adapter", data.fingerprint, base.fingerprint, recipe, {"packed": packed}, code, libraries)
        for code in code_hashes("training", training_modules(cfg.training.backend))
    ]


def training_fingerprint(cfg: PipelineConfig, data: ValidatedDataset, base: PreparedBase) -> str:
    return training_fingerprints(cfg, data, base)[0]


def _complete_steps(store: ArtifactStore, checkpoints_key: str) -> list[int]:
    """Steps of the checkpoints that have their marker, newest first."""
    steps = []
    for key in store.list(checkpoints_key):
        match = re.search(r"checkpoint-(\d+)/" + COMPLETE_MARKER + "$", key)
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps, reverse=True)


def newest_complete_checkpoint(store: ArtifactStore, checkpoints_key: str) -> tuple[int, str] | None:
    steps = _complete_steps(store, checkpoints_key)
    return (steps[0], f"{checkpoints_key}/checkpoint-{steps[0]}") if steps else None


def newest_verified_checkpoint(store: ArtifactStore, checkpoints_key: str) -> tuple[int, Path] | None:
    """The newest complete checkpoint whose files still match the sizes and SHA-256 its commit recorded.

    A checkpoint marked complete can be damaged later (full disk, a bad copy); resuming from it fails on
    every retry. A corrupt one is quarantined (see ArtifactStore.verified) and the next older one tried.
    """
    for step in _complete_steps(store, checkpoints_key):
        path = store.verified(f"{checkpoints_key}/checkpoint-{step}")
        if path is not None:
            return step, path
        log.warning("checkpoint at step %d failed verification; trying an older one", step)
    return None


def resume_point(store: ArtifactStore, fingerprints: list[str]) -> tuple[int, Path] | None:
    """The newest verified checkpoint under today's fingerprint, else under the first earlier one (code declared
    equivalent) that has one: a training cut off before an upgrade continues after it."""
    for fingerprint in fingerprints:
        found = newest_verified_checkpoint(store, adapter_checkpoints_key(fingerprint))
        if found is not None:
            if fingerprint != fingerprints[0]:
                log.info(
                    "resuming from a checkpoint of fingerprint %s, trained by earlier code declared equivalent "
                    "(qlora_flow/code_lineage.py)",
                    fingerprint[:24],
                )
            return found
    return None


def run_training(
    cfg: PipelineConfig,
    store: ArtifactStore,
    data: ValidatedDataset,
    base: PreparedBase,
    on_progress: Callable[[dict], None] | None = None,
) -> AdapterRef:
    """Train (or resume) in this process: fetch the inputs, run the backend's recipe, store the adapter.
    Use `train_adapter` for caching and process isolation.

    Each trainer log report goes to on_progress; without one it is printed for a parent process."""
    fingerprints = training_fingerprints(cfg, data, base)
    fingerprint = fingerprints[0]
    checkpoints_key, adapter_out_key = adapter_checkpoints_key(fingerprint), trained_adapter_key(fingerprint)
    prepare_device(base.device, cfg.training.memory_budget_gib)
    full_dir = store.fetch(store.key_of(base.full_precision_uri))
    plan = make_plan(cfg, base, full_dir)
    resume = resume_point(store, fingerprints)
    if resume is not None:
        log.info("resuming from complete checkpoint at step %d", resume[0])
    inputs = RecipeInputs(
        base_dir=full_dir,
        nf4_dir=store.fetch(store.key_of(base.nf4_uri)) if base.nf4_uri else None,
        train_file=store.fetch_file(data.train_uri),
        compute_dtype=base.compute_dtype,
        device=base.device,
        checkpoint_dir=store.workdir(checkpoints_key),
        adapter_dir=store.workdir(adapter_out_key),
        resume_from=resume[1] if resume else None,
    )
    _remove_incomplete_checkpoints(inputs.checkpoint_dir)
    stats = training_backend(cfg.training.backend).train_lora(
        cfg,
        plan,
        inputs,
        on_checkpoint=lambda name: store.commit(f"{checkpoints_key}/{name}"),
        on_log=on_progress or _print_progress,
    )
    ref = AdapterRef(
        uri=store.uri(adapter_out_key),
        checkpoint_uri=store.uri(checkpoints_key),
        fingerprint=fingerprint,
        resumed_from_step=resume[0] if resume else None,
        **dataclasses.asdict(stats),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        # keys, not URIs: the reference stays valid when the store is copied or moved
        (inputs.adapter_dir / ADAPTER_REF_NAME).write_text(
            json.dumps(store.as_keys(ref.model_dump(mode="json")), indent=2)
        )
        store.commit(adapter_out_key)
    return ref


def _print_progress(report: dict) -> None:
    """Progress lines on stdout, which the parent (run_training_in_child) reads and reports."""
    print(PROGRESS_PREFIX + json.dumps(report), flush=True)


def _remove_incomplete_checkpoints(output_dir: Path) -> None:
    """A checkpoint without its marker was cut off mid-write; the trainer must never see it."""
    for path in output_dir.glob("checkpoint-*"):
        if path.is_dir() and not (path / COMPLETE_MARKER).exists():
            shutil.rmtree(path, ignore_errors=True)


class _TrainSpec(BaseModel):
    config: PipelineConfig
    data: ValidatedDataset
    base: PreparedBase


def _child_command(cfg: PipelineConfig, base: PreparedBase, spec_path: Path, result_path: Path) -> list[str]:
    if base.device == "cuda" and cfg.execution.gpus > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={cfg.execution.gpus}",
            "-m",
            "tasks.train",
            str(spec_path),
            str(result_path),
        ]
    return [sys.executable, "-m", "tasks.train", str(spec_path), str(result_path)]


def run_training_in_child(
    cfg: PipelineConfig,
    data: ValidatedDataset,
    base: PreparedBase,
    on_line: Callable[[str], None] = print,
    on_progress: Callable[[dict], None] | None = None,
) -> AdapterRef:
    """Train in a child process group: logs stream to on_line; timeout or cancellation kills it."""
    with tempfile.TemporaryDirectory(prefix="qlora-train-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(_TrainSpec(config=cfg, data=data, base=base).model_dump_json())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}
        project_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = project_root + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(
            _child_command(cfg, base, spec_path, result_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # its own process group, so killing it takes torchrun workers too
        )
        # A watchdog, not a check per log line: a child that hangs silently must be killed too.
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            _kill_group(proc)

        watchdog = threading.Timer(cfg.execution.train_timeout_s, on_timeout)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                if line.startswith(PROGRESS_PREFIX):
                    if on_progress:
                        on_progress(json.loads(line[len(PROGRESS_PREFIX) :]))
                elif line:
                    on_line(line)
            proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            watchdog.cancel()
        if timed_out.is_set():
            raise TimeoutError(f"training exceeded execution.train_timeout_s={cfg.execution.train_timeout_s}")
        if proc.returncode != 0:
            raise RuntimeError(_child_failure(proc.returncode, result_path))
        return AdapterRef.model_validate_json(result_path.read_text())


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def train_adapter(
    cfg: PipelineConfig,
    store: ArtifactStore,
    data: ValidatedDataset,
    base: PreparedBase,
    on_line: Callable[[str], None] = print,
    on_progress: Callable[[dict], None] | None = None,
) -> AdapterRef:
    """Return the stored adapter for this exact request, or train (resuming if possible) and store it.

    The store's verified entry is the only training cache (no Prefect cache): an adapter that fails its check is
    quarantined and trained again. One stored under an earlier fingerprint (code_lineage) is used as it is."""
    fingerprints = training_fingerprints(cfg, data, base)
    found = find_result(store, "adapter", fingerprints, lambda fp: store.verified(trained_adapter_key(fp)))
    if found is not None:
        fingerprint, stored = found
        log.info("adapter %s already trained; reusing it", adapter_key(fingerprint))
        return AdapterRef.model_validate(store.as_uris(json.loads((stored / ADAPTER_REF_NAME).read_text())))
    if cfg.execution.isolate_gpu_stages:
        return run_training_in_child(cfg, data, base, on_line, on_progress)
    return run_training(cfg, store, data, base, on_progress)


def _child_main(spec_path: str, result_path: str) -> None:
    # force: importing Prefect already gave the root logger a WARNING-level handler, which swallowed the
    # INFO lines (the training plan, resume points) that the parent streams into the Prefect run's logs.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True)
    exit_with_parent()  # a SIGKILLed flow process must not leave this training holding the GPU
    spec = _TrainSpec.model_validate_json(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        ref = run_training(spec.config, open_store(spec.config.execution), spec.data, spec.base)
    except BaseException as exc:
        # the traceback still goes to the log; the parent raises with this line, not just an exit code
        Path(result_path).with_name(CHILD_ERROR_NAME.format(rank=rank)).write_text(_child_error_line(exc))
        raise
    if rank == 0:
        Path(result_path).write_text(ref.model_dump_json())


CHILD_ERROR_NAME = "error-rank{rank}.txt"  # beside the result file, one per rank that failed


def _child_error_line(exc: BaseException) -> str:
    """The CLI's `error:` text for the exception, on one line, with what to change after a CUDA out-of-memory."""
    import torch

    line = " ".join(one_line(exc).split())
    if len(line) > 400:
        line = line[:400] + " ..."
    if isinstance(exc, torch.OutOfMemoryError):
        line += (
            "; set training.memory_budget_gib to the memory this GPU can give (the planner then picks a smaller"
            " micro-batch, checkpointing or offload), or lower training.max_seq_length"
        )
    return line


def _child_failure(returncode: int, result_path: Path) -> str:
    """What the parent says when the training child failed: the child's own error line where it left one."""
    errors = sorted(result_path.parent.glob(CHILD_ERROR_NAME.format(rank="*")))
    if errors:
        return f"training failed: {errors[0].read_text()} (exit code {returncode}; the traceback is in the log above)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # real-time signals have numbers, not names
            name = f"signal {-returncode}"
        hint = (
            " (the kernel's out-of-memory killer sends SIGKILL when host memory runs out)" if name == "SIGKILL" else ""
        )
        return f"training process was killed by {name}{hint}"
    return f"training process exited with code {returncode}; see the log lines above"


def training_lock_name(cfg: PipelineConfig, data: ValidatedDataset, base: PreparedBase) -> str:
    return "train:" + adapter_key(training_fingerprint(cfg, data, base)).rsplit("/", 1)[-1]


@contextmanager
def training_lock(name: str) -> Iterator[None]:
    """One training per adapter fingerprint at a time, across flow runs, deployments and hosts.

    Two runs asking for the same adapter (a manual trigger while the schedule runs, say) would write
    the same checkpoint directory. The second one waits here, then finds the adapter complete and
    reuses it. A Prefect global concurrency limit of 1, held under a lease the client keeps renewing.
    """
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    with concurrency(name, occupy=1, strict=True):
        yield


def train_adapter_exclusively(
    cfg: PipelineConfig,
    store: ArtifactStore,
    data: ValidatedDataset,
    base: PreparedBase,
    on_line: Callable[[str], None] = print,
    on_progress: Callable[[dict], None] | None = None,
) -> AdapterRef:
    """`train_adapter` under this adapter's training lock: what the pipeline's task and each sweep point run."""
    with training_lock(training_lock_name(cfg, data, base)):
        return train_adapter(cfg, store, data, base, on_line=on_line, on_progress=on_progress)


# No Prefect cache: train_adapter's store lookup is the training cache (it verifies what it returns, and its
# lock makes a second request wait for the first); a retry resumes from the stored checkpoints.
@task(
    name="train_adapter",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=is_retryable,
)
def train_adapter_task(cfg: PipelineConfig, data: ValidatedDataset, base: PreparedBase) -> AdapterRef:
    logger = get_run_logger()
    progress = TrainingProgressArtifact()

    def on_progress(report: dict) -> None:
        line = progress.update(report)
        if "loss" in report:
            logger.info(line)

    ref = train_adapter_exclusively(cfg, open_store(cfg.execution), data, base, logger.info, on_progress)
    progress.finish(ref.steps)
    return ref


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
