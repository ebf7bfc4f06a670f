"""A real S3 API for tests: moto's server in a child process, and a fault-injecting proxy.

The proxy speaks plain HTTP/1.1 on loopback and forwards each request to the server unless a
rule says otherwise: answer with an S3 error (500, 503 SlowDown, 501 ...), cut the connection
half-way through a request body, or go dark altogether (every connection closed unanswered,
as when the server process dies). Going dark at the proxy keeps the server's in-memory state,
so a test can look at what storage holds after the "crash" and then "restart" the endpoint.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from botocore.config import Config

ACCESS_KEY = "AKIATESTQLORAFLOW000"
SECRET_KEY = "qlora-flow-test-secret-9f3b2c1d7e6a5b4c"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """moto_server in a child process (a separate interpreter, so it can be killed)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Fault:
    """What the proxy does with one request instead of forwarding it."""

    status: int = 0  # answer with this HTTP status and S3 error code
    code: str = ""
    drop: bool = False  # read half the body, then close the connection unanswered


Rule = Callable[[str, str, dict], Fault | None]


@dataclass
class FaultProxy:
    upstream_port: int
    port: int = field(default_factory=free_port)
    rule: Rule | None = None
    dark: bool = False
    log: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status or -1 for cut)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def setup(self) -> None:
                super().setup()
                # headers and body go out as two writes: without this, Nagle + delayed ACK add ~40 ms each
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _relay(self) -> None:
                # the proxy already answered any 100-continue itself
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                length = int(headers.get("Content-Length", 0))
                if proxy.dark:
                    proxy._record(self.command, self.path, -1)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                fault = proxy.rule(self.command, self.path, headers) if proxy.rule else None
                if fault and fault.drop:
                    self.rfile.read(length // 2)
                    proxy._record(self.command, self.path, -1)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = self.rfile.read(length) if length else b""
                if fault:
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault.code}</Code>'
                        f"<Message>injected by test proxy</Message></Error>"
                    ).encode()
                    proxy._record(self.command, self.path, fault.status)
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                proxy._record(self.command, self.path, resp.status)
                self.send_response_only(resp.status, resp.reason)
                for name, value in resp.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # HEAD answers carry the object's length but no body
                self.send_header(
                    "Content-Length",
                    resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)),
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append((method, path, status))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def s3_client(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(retries={"mode": "standard", "max_attempts": 3}),
    )


def set_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point boto3's standard chain at the fake keys (and away from any real AWS config)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@dataclass
class S3Env:
    """A running server, a proxy in front of it, and a raw client that bypasses the proxy."""

    server: MotoServer
    proxy: FaultProxy
    bucket: str

    @property
    def raw(self):
        return s3_client(self.server.url)

    def settings(self, **overrides):
        from qlora_flow.config import S3Settings

        base = dict(
            endpoint_url=self.proxy.url,
            region="us-east-1",
            multipart_threshold_mib=5,
            multipart_chunksize_mib=5,
            max_concurrency=4,
            max_attempts=4,
            connect_timeout_s=2,
            read_timeout_s=10,
        )
        return S3Settings(**{**base, **overrides})

    def store(self, cache_dir, prefix: str = "store", **overrides):
        from qlora_flow.s3store import S3Store

        return S3Store.from_config(f"s3://{self.bucket}/{prefix}", self.settings(**overrides), cache_dir=cache_dir)

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        client = self.raw
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
        return out


def make_env(server: MotoServer) -> S3Env:
    """A fresh bucket and proxy on a shared server; the caller stops the proxy."""
    bucket = f"qf-test-{uuid.uuid4().hex[:12]}"  # unique across sessions: Prefect records outlive the server
    s3_client(server.url).create_bucket(Bucket=bucket)
    return S3Env(server, FaultProxy(server.port).start(), bucket)


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def s3env(moto_server, monkeypatch):
    set_test_credentials(monkeypatch)
    env = make_env(moto_server)
    yield env
    env.proxy.stop()


@dataclass
class StagedRun:
    """Fake stage outputs of one run, committed to a store like the real stages would."""

    run_id: str
    refs: dict  # keyword arguments of publish_run: merged, adapter, report, data, base
    model_files: dict[str, bytes]


def stage_run(store, run_id: str, *, seed: int = 0, passed: bool = True, model_mib: int = 1) -> StagedRun:
    import random

    from qlora_flow.refs import (
        AdapterRef,
        EvalReport,
        GateVerdict,
        LossPoint,
        MergedModel,
        PreparedBase,
        ValidatedDataset,
    )

    rng = random.Random(f"{run_id}-{seed}")
    model_files = {
        "model.safetensors": rng.randbytes(model_mib << 20),
        "config.json": json.dumps({"run": run_id, "hidden_size": 64}).encode(),
        "tokenizer.json": rng.randbytes(2048),
        "chat_template.jinja": b"{{ messages }}",
    }

    def commit(key: str, files: dict[str, bytes]) -> str:
        work = store.workdir(key)
        for rel, data in files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        return store.commit(key)

    model_uri = commit(f"runs/{run_id}/model", model_files)
    adapter_fp = f"adapter-{run_id}-{seed}"
    commit(
        f"cache/adapter/{adapter_fp}",
        {
            "adapter/adapter_model.safetensors": rng.randbytes(4096),
            "adapter/adapter_config.json": b'{"r": 4}',
            "checkpoints/checkpoint-2/optimizer.pt": rng.randbytes(1024),
        },
    )
    data_fp = f"data-{seed}"
    commit(
        f"cache/data/{data_fp}",
        {
            "train.jsonl": b'{"messages": []}\n',
            "eval.jsonl": b'{"messages": []}\n',
            "report.json": b'{"rows": 40}',
            "quarantine.jsonl": b'{"row": 3, "reason": "empty"}\n',
        },
    )
    eval_uri = commit(
        f"runs/{run_id}/eval",
        {"report.json": json.dumps({"passed": passed}).encode(), "samples.jsonl": b'{"prompt": "p"}\n'},
    )
    cache = store.uri(f"cache/data/{data_fp}")
    refs = dict(
        merged=MergedModel(uri=model_uri, fingerprint=f"merged-{run_id}", dtype="bfloat16", verification={"top1": 1.0}),
        adapter=AdapterRef(
            uri=store.uri(f"cache/adapter/{adapter_fp}/adapter"),
            checkpoint_uri=store.uri(f"cache/adapter/{adapter_fp}/checkpoints"),
            fingerprint=adapter_fp,
            trainable_parameters=1000,
            steps=6,
            loss_history=[LossPoint(step=1, loss=2.0), LossPoint(step=6, loss=1.0)],
            tokens_seen=4096,
            train_seconds=1.5,
            tokens_per_second=2730.0,
        ),
        report=EvalReport(
            uri=f"{eval_uri}/report.json",
            base_metrics={"eval_loss": 2.0, "exact_match": 0.1},
            tuned_metrics={"eval_loss": 1.0, "exact_match": 0.5 + seed / 100},
            samples_uri=f"{eval_uri}/samples.jsonl",
            verdict=GateVerdict(passed=passed, reasons=["loss improved"] if passed else ["exact match regressed"]),
        ),
        data=ValidatedDataset(
            train_uri=f"{cache}/train.jsonl",
            eval_uri=f"{cache}/eval.jsonl",
            quarantine_uri=f"{cache}/quarantine.jsonl",
            report_uri=f"{cache}/report.json",
            n_input_rows=41,
            n_train=32,
            n_eval=8,
            n_rejected=1,
            source_format="messages",
            fingerprint=data_fp,
        ),
        base=PreparedBase(
            model_id="tiny-llama",
            architecture="LlamaForCausalLM",
            full_precision_uri=store.uri("cache/base/b1/fp16"),
            fingerprint="base-fp",
            compute_dtype="float32",
            device="cpu",
            parameters=123,
            footprint_bytes_16bit=246,
            load_seconds=0.1,
        ),
    )
    return StagedRun(run_id, refs, model_files)
