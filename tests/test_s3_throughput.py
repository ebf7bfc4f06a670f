"""≥1 GiB through S3Store.commit vs plain put_object, against moto's server (run with -m slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from s3server import moto_server, s3env  # noqa: F401  (fixtures)

_BENCH = Path(__file__).resolve().parent.parent / "bench" / "upload_throughput.py"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_upload_throughput_1gib(s3env, tmp_path):
    spec = importlib.util.spec_from_file_location("upload_throughput", _BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings = s3env.settings(
        endpoint_url=s3env.server.url, multipart_threshold_mib=16, multipart_chunksize_mib=16, max_concurrency=8
    )

    result = bench.run(s3env.server.url, s3env.bucket, 1024, 128, tmp_path, settings)

    print(
        f"\n{result['mib']:.0f} MiB in {result['files']} files: transfer manager {result['transfer_manager_mib_s']:.1f} MiB/s, "
        f"plain put_object {result['put_object_mib_s']:.1f} MiB/s"
    )
    assert result["mib"] >= 1024
    listing = s3env.raw.list_objects_v2(Bucket=s3env.bucket, Prefix="bench/runs/bench/model/")
    shards = [o for o in listing["Contents"] if not o["Key"].endswith("_COMPLETE")]
    assert len(shards) == 8 and sum(o["Size"] for o in shards) == 1024 << 20
    assert result["transfer_manager_mib_s"] > 0 and result["put_object_mib_s"] > 0
