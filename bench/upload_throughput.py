"""Upload throughput: S3Store.commit (boto3 transfer manager) vs one plain put_object per file.

    python bench/upload_throughput.py [--endpoint URL] [--total-mib 1024] [--file-mib 128]

Without --endpoint it starts moto's server on loopback (fake credentials), so the numbers then
measure this machine and moto as much as the client; point it at MinIO or S3 for real ones.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

from qlora_flow.config import S3Settings
from qlora_flow.s3store import S3Store, make_client

MIB = 1 << 20


def write_random_files(root: Path, total_mib: int, file_mib: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(max(1, total_mib // file_mib)):
        path = root / f"shard-{i:04d}.bin"
        with open(path, "wb") as fh:
            for _ in range(file_mib):
                fh.write(os.urandom(MIB))
        paths.append(path)
    return paths


def run(endpoint: str, bucket: str, total_mib: int, file_mib: int, workdir: Path, settings: S3Settings) -> dict:
    """Upload the same files both ways; returns seconds and MiB/s of each."""
    store = S3Store(f"s3://{bucket}/bench", make_client(settings), workdir / "cache", settings)
    files = write_random_files(store.workdir("runs/bench/model"), total_mib, file_mib)
    size_mib = sum(p.stat().st_size for p in files) / MIB

    start = time.perf_counter()
    store.commit("runs/bench/model")
    managed = time.perf_counter() - start

    client = make_client(settings)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb") as fh:
            client.put_object(Bucket=bucket, Key=f"plain/{path.name}", Body=fh)
    plain = time.perf_counter() - start
    return {
        "files": len(files),
        "mib": size_mib,
        "transfer_manager_s": managed,
        "transfer_manager_mib_s": size_mib / managed,
        "put_object_s": plain,
        "put_object_mib_s": size_mib / plain,
        "max_concurrency": settings.max_concurrency,
        "chunk_mib": settings.multipart_chunksize_mib,
    }


def _start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", help="S3 endpoint; default: a local moto server")
    parser.add_argument("--bucket", default="qlora-flow-bench")
    parser.add_argument("--total-mib", type=int, default=1024)
    parser.add_argument("--file-mib", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--chunk-mib", type=int, default=16)
    args = parser.parse_args(argv)

    proc = None
    endpoint = args.endpoint
    if endpoint is None:
        proc, endpoint = _start_moto()
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    settings = S3Settings(
        endpoint_url=endpoint,
        region="us-east-1",
        max_concurrency=args.concurrency,
        multipart_chunksize_mib=args.chunk_mib,
        multipart_threshold_mib=args.chunk_mib,
    )
    try:
        if args.endpoint is None:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=args.bucket)
        with tempfile.TemporaryDirectory() as tmp:
            result = run(endpoint, args.bucket, args.total_mib, args.file_mib, Path(tmp), settings)
    finally:
        if proc:
            proc.kill()
            proc.wait()
    print(
        f"{result['files']} files, {result['mib']:.0f} MiB: "
        f"transfer manager {result['transfer_manager_s']:.1f} s ({result['transfer_manager_mib_s']:.0f} MiB/s, "
        f"{args.concurrency} threads, {args.chunk_mib} MiB parts, incl. hashing and verification); "
        f"plain put_object {result['put_object_s']:.1f} s ({result['put_object_mib_s']:.0f} MiB/s)"
    )
    return result


if __name__ == "__main__":
    main()
