"""Bad configurations through the real CLI: every one ends fast with exactly one `error:` line that
names the field or file, a non-zero exit code, and no traceback, for `run` and `validate` alike.

They all fail in preflight (qlora_flow.preflight), before torch or Prefect are imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import yaml
from s3server import MotoServer

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 30.0


@dataclass
class Case:
    id: str
    expect: list[str]  # substrings of the error line
    text: str | None = None  # the config file verbatim, or None for the valid base config ...
    patch: dict = field(default_factory=dict)  # ... with these dotted keys changed (None deletes)
    args: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    limit_s: float = LIMIT_S


_SETUP = {"endpoint": "http://127.0.0.1:1"}  # filled in by the s3 fixture
UNREACHABLE_HUB = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"}
LOCAL_CHOICES = ["base_model.id", "local model directory", ".gguf", "pkg:", "s3://"]

CASES = [
    Case("empty-file", ["cfg.yaml", "is empty"], text=""),
    Case("comments-only", ["cfg.yaml", "only comments"], text="# data:\n#   train_path: x.jsonl\n"),
    Case("a-list", ["cfg.yaml", "mapping of sections", "not a list"], text="- data\n- training\n"),
    Case("a-scalar", ["cfg.yaml", "not a str"], text="hello\n"),
    Case("malformed-yaml", ["cfg.yaml", "not valid YAML", "line 3"], text="lora:\n  r: 4\n alpha: 8\n"),
    Case("not-utf8", ["cfg.yaml", "cannot be read"], text="\udcff"),
    Case("missing-config-file", ["nowhere.yaml", "not found"], args=["__config__=nowhere.yaml"]),
    Case("unknown-key", ["lora.rank", "unknown key"], patch={"lora.rank": 8}),
    Case("unknown-section", ["trainig", "unknown key"], patch={"trainig": {"max_steps": 3}}),
    Case("wrong-type", ["training.max_steps", "valid integer"], patch={"training.max_steps": "many"}),
    Case("out-of-range", ["lora.r", "greater than 0"], patch={"lora.r": 0}),
    Case(
        "cross-field", ["training.offload"], patch={"training.offload": "on", "training.gradient_checkpointing": "off"}
    ),
    Case("unknown-backend", ["training.backend", "'unsloth'", "known: trl"], patch={"training.backend": "unsloth"}),
    Case(
        "float16-on-cpu",
        ["quantization.compute_dtype", "not supported on the CPU"],
        patch={"quantization.compute_dtype": "float16", "execution.device": "cpu"},
    ),
    Case(
        "missing-train-file",
        ["data.train_path", "absent.jsonl", "does not exist"],
        patch={"data.train_path": "absent.jsonl"},
    ),
    Case("missing-eval-file", ["data.eval_path", "gone.jsonl"], patch={"data.eval_path": "/nonexistent/gone.jsonl"}),
    Case(
        "base-model-path-missing", [*LOCAL_CHOICES, "/nonexistent/llama"], patch={"base_model.id": "/nonexistent/llama"}
    ),
    Case("gguf-missing", ["base_model.id", "GGUF file", "no.gguf"], patch={"base_model.id": "./models/no.gguf"}),
    Case("pkg-not-installed", ["base_model.id", "not installed"], patch={"base_model.id": "pkg:no_such_pkg/m.gguf"}),
    Case("not-a-hub-id", [*LOCAL_CHOICES, "a/b/c"], patch={"base_model.id": "a/b/c"}),
    Case(
        "unknown-hub-id-offline",
        [*LOCAL_CHOICES, "nobody/no-such-model", "HF_HUB_OFFLINE"],
        patch={"base_model.id": "nobody/no-such-model"},
        env={"HF_HUB_OFFLINE": "1"},
        limit_s=10,
    ),
    Case(
        "unknown-hub-id-unreachable",
        [*LOCAL_CHOICES, "nobody/no-such-model", "cannot be reached"],
        patch={"base_model.id": "nobody/no-such-model"},
        env=UNREACHABLE_HUB,
        limit_s=10,
    ),
    Case(
        "tokenizer-path-missing",
        ["base_model.tokenizer_id", "/nonexistent/tok"],
        patch={"base_model.tokenizer_id": "/nonexistent/tok"},
    ),
    Case("model-name-dotdot", ["publish.model_name", "'..'", "names a directory"], patch={"publish.model_name": ".."}),
    Case("model-name-slash", ["publish.model_name", "'team/model'"], patch={"publish.model_name": "team/model"}),
    Case("alias-escape", ["publish.alias", "../production"], patch={"publish.alias": "../production"}),
    Case("run-name-absolute", ["execution.run_name", "/tmp/run"], patch={"execution.run_name": "/tmp/run"}),
    Case("store-is-a-file", ["execution.store", "is a file"], patch={"execution.store": "__train__"}),
    Case("set-without-equals", ["--set", "expected KEY=VALUE"], args=["--set", "lora.r"]),
    Case("set-bad-yaml", ["--set", "not valid YAML"], args=["--set", "lora.target_modules=[q_proj"]),
    Case("set-below-a-value", ["lora.r.x", "lora.r is a value"], args=["--set", "lora.r=4", "--set", "lora.r.x=1"]),
    Case(
        "s3-endpoint-unreachable",
        ["execution.s3.endpoint_url", "http://127.0.0.1:1", "cannot connect"],
        patch={"execution.store": "s3://b/p", "execution.s3.endpoint_url": "http://127.0.0.1:1"},
        env={"AWS_ACCESS_KEY_ID": "AKIAUNREACHABLE00000", "AWS_SECRET_ACCESS_KEY": "x"},
    ),
    Case(
        "s3-bad-endpoint-url",
        ["execution.s3.endpoint_url"],
        patch={"execution.store": "s3://b/p", "execution.s3.endpoint_url": "not a url"},
        env={"AWS_ACCESS_KEY_ID": "AKIAUNREACHABLE00000", "AWS_SECRET_ACCESS_KEY": "x"},
    ),
    Case(
        "s3-bad-credentials",
        ["execution.s3", "rejected the credentials", "InvalidAccessKeyId"],
        patch={"execution.store": "s3://qf-cli/store", "execution.s3.endpoint_url": "__endpoint__"},
        env={"AWS_ACCESS_KEY_ID": "AKIABADBADBADBADBAD0", "AWS_SECRET_ACCESS_KEY": "wrong"},
    ),
    Case(
        "s3-wrong-secret",
        ["execution.s3", "rejected the credentials", "SignatureDoesNotMatch"],
        patch={"execution.store": "s3://qf-cli/store", "execution.s3.endpoint_url": "__endpoint__"},
        env={"AWS_ACCESS_KEY_ID": "__key__", "AWS_SECRET_ACCESS_KEY": "wrong"},
    ),
    Case(
        "s3-no-credentials",
        ["execution.store", "no S3 credentials"],
        patch={"execution.store": "s3://qf-cli/store", "execution.s3.endpoint_url": "__endpoint__"},
    ),
    Case(
        "s3-missing-bucket",
        ["execution.store", "bucket 'no-such-bucket' does not exist"],
        patch={"execution.store": "s3://no-such-bucket/store", "execution.s3.endpoint_url": "__endpoint__"},
        env={"AWS_ACCESS_KEY_ID": "__key__", "AWS_SECRET_ACCESS_KEY": "__secret__"},
    ),
    Case(
        "s3-base-model-without-config",
        ["base_model.id", "s3://qf-cli/models/llama/config.json"],
        patch={"base_model.id": "s3://qf-cli/models/llama", "execution.s3.endpoint_url": "__endpoint__"},
        env={"AWS_ACCESS_KEY_ID": "__key__", "AWS_SECRET_ACCESS_KEY": "__secret__"},
    ),
    Case(
        "s3-missing-data",
        ["data.train_path", "nothing is stored at s3://qf-cli/none.jsonl"],
        patch={"data.train_path": "s3://qf-cli/none.jsonl", "execution.s3.endpoint_url": "__endpoint__"},
        env={"AWS_ACCESS_KEY_ID": "__key__", "AWS_SECRET_ACCESS_KEY": "__secret__"},
    ),
]


@pytest.fixture(scope="module")
def s3_with_auth():
    """A moto server that checks credentials: its first four requests (unauthenticated) create a user
    allowed s3:*, that user's key and a bucket; every later request needs a valid key."""
    previous = os.environ.get("INITIAL_NO_AUTH_ACTION_COUNT")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"
    try:
        server = MotoServer().start()
    finally:
        if previous is None:
            os.environ.pop("INITIAL_NO_AUTH_ACTION_COUNT")
        else:
            os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = previous
    anonymous = dict(
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id="AKIASETUP00000000000",
        aws_secret_access_key="setup",
    )
    iam = boto3.client("iam", **anonymous)
    iam.create_user(UserName="pipeline")
    key = iam.create_access_key(UserName="pipeline")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="pipeline", PolicyName="s3", PolicyDocument=json.dumps(policy))
    boto3.client("s3", **anonymous).create_bucket(Bucket="qf-cli")
    yield {"__endpoint__": server.url, "__key__": key["AccessKeyId"], "__secret__": key["SecretAccessKey"]}
    server.stop()


def _base_config(tmp_path: Path) -> dict:
    train = tmp_path / "train.jsonl"
    train.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
    )
    model = tmp_path / "model"  # resolves as a local model directory; preflight never loads it
    model.mkdir()
    (model / "config.json").write_text("{}")
    return {
        "data": {"train_path": str(train)},
        "base_model": {"id": str(model)},
        "execution": {"store": str(tmp_path / "store"), "local_cache": str(tmp_path / "cache")},
    }


def _fill(value, subst: dict):
    if isinstance(value, str):
        return subst.get(value, value)
    return value


def _write_config(case: Case, tmp_path: Path, subst: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    if case.text is not None:
        path.write_bytes(case.text.encode("utf-8", "surrogateescape"))
        return path
    raw = _base_config(tmp_path)
    for dotted, value in case.patch.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _fill(value, subst)
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(case: Case, tmp_path: Path, subst: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(tmp_path / "hf-cache"),  # nothing cached: the hub check cannot pass from a cache
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups for credentials
        }
    )
    for key, value in case.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = _fill(value, subst)
    return env


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_configuration_is_one_error_line(case, command, tmp_path, s3_with_auth):
    subst = {**s3_with_auth, "__train__": str(tmp_path / "train.jsonl")}
    config = _write_config(case, tmp_path, subst)
    args = [a.split("=", 1)[1] if a.startswith("__config__=") else a for a in case.args]
    config_arg = [] if any(a.startswith("__config__=") for a in case.args) else [str(config)]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_flow.cli", command, *config_arg, *args],
        cwd=tmp_path,
        env=_env(case, tmp_path, subst),
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr

    assert proc.returncode != 0, output
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, output
    for expected in case.expect:
        assert expected in error_lines[0], output
    assert "Traceback" not in output
    assert elapsed < case.limit_s, f"{elapsed:.1f} s: {output}"


def test_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("lora:\n  r: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_flow.cli", "--debug", "validate", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr and "lora.r" in proc.stderr


def test_offline_hub_id_in_the_local_cache_passes_preflight(tmp_path, monkeypatch):
    """The offline check refuses only what is not cached: a cached hub id still works without network."""
    from qlora_flow.config import load_config
    from qlora_flow.preflight import check_base_model

    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    check_base_model(load_config(None, {"base_model.id": "acme/tiny"}).base_model)  # no error


@pytest.fixture
def fake_hub(monkeypatch):
    """A loopback stand-in for huggingface.co: /api/models/acme/tiny exists, everything else is 404,
    /api/models/slow/model never answers in time."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.startswith("/api/models/slow/"):
                time.sleep(3)
            known = self.path.startswith("/api/models/acme/tiny")
            body = json.dumps({"id": "acme/tiny"} if known else {"error": "Repository not found"}).encode()
            self.send_response(200 if known else 404)
            if not known:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    yield
    server.shutdown()


def test_online_hub_check_asks_the_hub_once(fake_hub, tmp_path, monkeypatch):
    from qlora_flow.config import ConfigError, load_config
    from qlora_flow.preflight import check_base_model

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    check_base_model(load_config(None, {"base_model.id": "acme/tiny"}).base_model)  # the hub knows it
    with pytest.raises(ConfigError, match=r"base_model\.id: 'nobody/nothing' does not exist on the Hugging Face hub"):
        check_base_model(load_config(None, {"base_model.id": "nobody/nothing"}).base_model)

    monkeypatch.setattr("qlora_flow.preflight.HUB_DEADLINE_S", 1.0)
    started = time.monotonic()
    with pytest.raises(
        ConfigError,
        match=r"base_model\.id: 'slow/model' is not a local path, not in the Hugging Face cache, and the hub",
    ):
        check_base_model(load_config(None, {"base_model.id": "slow/model"}).base_model)
    assert time.monotonic() - started < 2.5
