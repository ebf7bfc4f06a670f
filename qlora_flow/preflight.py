"""Checks that run before the flow and before torch/transformers are imported, so that a config
that cannot work fails in seconds with one line naming the field, instead of deep inside a stage
after retries: missing local inputs, a base model that cannot be found (local path, package,
hub id offline), and S3 locations whose endpoint, credentials or bucket do not work.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from qlora_flow.config import (
    BaseModelConfig,
    ConfigError,
    LoraSettings,
    PipelineConfig,
    S3Settings,
    check_local_inputs,
)
from qlora_flow.errors import CREDENTIAL_S3_CODES, s3_error_code
from qlora_flow.sources import resolve_source

HUB_DEADLINE_S = 8.0  # one hub lookup, DNS included; the whole check stays under 10 s
S3_CONNECT_TIMEOUT_S = 3.0
S3_ATTEMPTS = 2  # a refused or silent endpoint fails in one retry, not after execution.s3.max_attempts

WHERE_TO_POINT = (
    "point base_model.id at a local model directory, a .gguf file, pkg:<package>/<file.gguf> or an "
    "s3://bucket/prefix holding a model directory"
)


def preflight(cfg: PipelineConfig, quick: bool = True) -> None:
    """Raise ConfigError (one line, naming the field) when the config cannot run here.

    quick (the CLI): S3 gets one retry with a short connect timeout, so a wrong endpoint is reported
    in seconds. Flows pass quick=False: an unattended run gives a briefly unavailable endpoint the
    configured execution.s3 retries before it gives up.
    """
    check_local_inputs(cfg)
    _check_local_store(cfg.execution.store)
    _check_local_cache(cfg.execution.local_cache)
    check_base_model(cfg.base_model, cfg.lora)
    check_s3_locations(cfg, quick)


def _check_local_store(store: str) -> None:
    if store.startswith("s3://"):
        return
    path = Path(store).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"execution.store: {store!r} is a file, not a directory; point it at a directory or s3:// URI"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)  # what opening the store does first anyway
    except OSError as exc:
        raise ConfigError(
            f"execution.store: cannot create {store!r} ({exc.strerror}); choose another directory"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"execution.store: cannot write into {store!r} (permission denied); choose another directory")


def _check_local_cache(local_cache: str) -> None:
    path = Path(local_cache).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"execution.local_cache: {local_cache!r} is a file, not a directory; point it at a directory")


# ---------------------------------------------------------------- base model


def check_base_model(base: BaseModelConfig, lora: LoraSettings | None = None) -> None:
    try:
        source = resolve_source(base)
    except FileNotFoundError as exc:
        raise ConfigError(f"{exc}; {WHERE_TO_POINT}") from None
    if source.kind == "hub":
        check_hub_repo("base_model.id", base.id, base.revision, "config.json", WHERE_TO_POINT)
    if source.kind == "dir" and lora is not None:
        check_lora_targets(lora, Path(source.location), base.id)
    if base.tokenizer_id:
        path = Path(base.tokenizer_id).expanduser()
        if path.is_dir():
            return
        hint = "point base_model.tokenizer_id at a local tokenizer directory or a hub id"
        if path.is_file():
            raise ConfigError(f"base_model.tokenizer_id: {base.tokenizer_id} is a file, not a directory; {hint}")
        if path.is_absolute() or base.tokenizer_id.startswith("."):
            raise ConfigError(f"base_model.tokenizer_id: {base.tokenizer_id} does not exist; {hint}")
        check_hub_repo("base_model.tokenizer_id", base.tokenizer_id, base.revision, "tokenizer_config.json", hint)


def matrix_modules(model_dir: Path) -> dict[str, list[int]] | None:
    """Shapes of the 2-D weights (linear and embedding layers: what LoRA adapts) by module name, read from
    the JSON headers of a model directory's safetensors shards (no torch, no weights); None when it has
    no readable safetensors files."""
    modules: dict[str, list[int]] = {}
    shards = sorted(model_dir.glob("*.safetensors"))
    for shard in shards:
        try:
            with open(shard, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        except (OSError, ValueError):  # unreadable or not safetensors: loading the model reports it
            return None
        modules |= {
            name.removesuffix(".weight"): info["shape"]
            for name, info in header.items()
            if name.endswith(".weight") and len(info.get("shape", ())) == 2
        }
    return modules if shards else None


def check_lora_targets(lora: LoraSettings, model_dir: Path, model_id: str) -> None:
    """Every lora.target_modules name must name a layer of the model, as peft matches a list (the module's
    full name or its last dotted parts), and lora.r must fit at least one of them; otherwise peft stops
    the training child with a traceback, or the adapter takes more memory than the layers it adapts."""
    modules = matrix_modules(model_dir)
    if modules is None:
        return
    config = model_dir / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("tie_word_embeddings"):
        # tied: stored once, as the input embedding, yet a module of its own that LoRA can adapt
        embedding = [shape for m, shape in modules.items() if m.rsplit(".", 1)[-1] in ("embed_tokens", "wte")]
        if embedding:
            modules.setdefault("lm_head", embedding[0])
    targets = lora.target_modules
    hit = {t: [m for m in modules if m == t or m.endswith("." + t)] for t in targets}
    missing = [t for t in targets if not hit[t]]
    if missing:
        known = sorted({m.rsplit(".", 1)[-1] for m in modules})
        raise ConfigError(
            f"lora.target_modules: {', '.join(map(repr, missing))} names no linear layer of the base model "
            f"{model_id}; its layers are called {', '.join(known[:30])}"
        )
    widest = max(min(modules[m]) for found in hit.values() for m in found)
    if lora.r > widest:
        raise ConfigError(
            f"lora.r: {lora.r} is more than the rank of every adapted layer of {model_id} (at most {widest}); "
            "a larger rank adds memory, not capacity"
        )


def check_hub_repo(field: str, repo_id: str, revision: str | None, probe_file: str, hint: str) -> None:
    """A hub id is usable when its files are in the local Hugging Face cache or the hub knows it.

    Offline (HF_HUB_OFFLINE, or no route to the hub) an id that is not cached cannot work, and
    transformers would only find that out after its retries (50 s and more).
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(
            f"{field}: {repo_id!r} is neither an existing local path nor a hub id (org/name); {hint}"
        ) from None
    if isinstance(try_to_load_from_cache(repo_id, probe_file, revision=revision), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{field}: {repo_id!r} is not a local path and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            f"and the hub is switched off (HF_HUB_OFFLINE); {hint}"
        )
    problem = _ask_hub(repo_id, revision)
    if problem:
        raise ConfigError(f"{field}: {repo_id!r} {problem}; {hint}")


def _ask_hub(repo_id: str, revision: str | None) -> str | None:
    """What is wrong with repo_id according to the hub, or None when it exists. Bounded by
    HUB_DEADLINE_S: name resolution has no timeout of its own, so the lookup runs in a thread."""
    outcome: dict[str, BaseException | None] = {}

    def lookup() -> None:
        from huggingface_hub import HfApi

        try:
            HfApi().model_info(repo_id, revision=revision, timeout=HUB_DEADLINE_S / 2)
            outcome["error"] = None
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=lookup, name="hub-preflight", daemon=True)
    worker.start()
    worker.join(HUB_DEADLINE_S)
    if "error" not in outcome:
        return f"is not a local path, not in the Hugging Face cache, and the hub did not answer within {HUB_DEADLINE_S:.0f} s"
    exc = outcome["error"]
    if exc is None:
        return None
    kind = type(exc).__name__
    if kind == "GatedRepoError":
        return "is a gated hub repository: accept its terms on huggingface.co and set HF_TOKEN"
    if kind == "RepositoryNotFoundError":
        return "does not exist on the Hugging Face hub (or is private: set HF_TOKEN)"
    if kind == "RevisionNotFoundError":
        return f"has no revision {revision!r} on the hub (base_model.revision)"
    reason = str(exc).splitlines()[0][:200] if str(exc) else kind
    return f"is not a local path, not in the Hugging Face cache, and the hub cannot be reached ({reason})"


# ---------------------------------------------------------------- S3


def quick_s3_client(settings: S3Settings, endpoint_field: str, quick: bool = True):
    """A client like the stages'; quick: with a short connect timeout and one retry."""
    from botocore.exceptions import BotoCoreError

    from qlora_flow.s3store import make_client

    if quick:
        settings = settings.model_copy(
            update={
                "connect_timeout_s": min(settings.connect_timeout_s, S3_CONNECT_TIMEOUT_S),
                "read_timeout_s": min(settings.read_timeout_s, 10.0),
                "max_attempts": min(settings.max_attempts, S3_ATTEMPTS),
            }
        )
    try:
        return make_client(settings)
    except (BotoCoreError, ValueError) as exc:  # unknown profile, bad endpoint URL, missing credentials block
        field = endpoint_field if "endpoint" in str(exc).lower() else "execution.s3"
        raise ConfigError(f"{field}: {exc}") from None


def check_s3_uri(client, field: str, uri: str, endpoint_field: str, must_exist: bool = False) -> None:
    """One LIST request: the endpoint answers, accepts the credentials, and the bucket exists."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    from qlora_flow.s3store import parse_s3_uri

    try:
        bucket, prefix = parse_s3_uri(uri)
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from None
    endpoint = client.meta.endpoint_url
    try:
        found = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except (EndpointConnectionError, ConnectTimeoutError):
        raise ConfigError(
            f"{endpoint_field}: cannot connect to {endpoint} (needed for {field} {uri}); start the server or fix the URL"
        ) from None
    except (ConnectionClosedError, ReadTimeoutError) as exc:
        raise ConfigError(
            f"{endpoint_field}: {endpoint} accepts connections but does not answer S3 requests "
            f"({type(exc).__name__}, needed for {field} {uri}); is it an S3 server?"
        ) from None
    except NoCredentialsError:
        raise ConfigError(
            f"{field}: no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "execution.s3.profile or execution.s3.credentials_block"
        ) from None
    except ClientError as exc:
        code = s3_error_code(exc)
        if code == "NoSuchBucket":
            raise ConfigError(
                f"{field}: bucket {bucket!r} does not exist at {endpoint}; create it or fix {uri}"
            ) from None
        if code in CREDENTIAL_S3_CODES:
            raise ConfigError(
                f"execution.s3: {endpoint} rejected the credentials ({code}) for {uri}; check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, execution.s3.profile or execution.s3.credentials_block"
            ) from None
        if code in ("AccessDenied", "403", "Forbidden"):
            raise ConfigError(
                f"{field}: access to {uri} denied by {endpoint} ({code}); the credentials need to list, read and "
                "write it"
            ) from None
        raise
    if must_exist and not found.get("KeyCount"):
        raise ConfigError(f"{field}: nothing is stored at {uri}")


def check_s3_locations(cfg: PipelineConfig, quick: bool = True) -> None:
    locations = [
        ("execution.store", cfg.execution.store, False),
        ("data.train_path", cfg.data.train_path, True),
        ("data.eval_path", cfg.data.eval_path, True),
        # a model directory: its config.json must be there (prepare_base_model needs it)
        ("base_model.id", cfg.base_model.id.rstrip("/") + "/config.json", True),
    ]
    remote = [(field, uri, must) for field, uri, must in locations if uri and uri.startswith("s3://")]
    if not remote:
        return
    client = quick_s3_client(cfg.execution.s3, "execution.s3.endpoint_url", quick)
    for field, uri, must_exist in remote:
        check_s3_uri(client, field, uri, "execution.s3.endpoint_url", must_exist)
