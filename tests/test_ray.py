"""The sweep's GPU stages on Ray (prefect-ray): a local Ray instance with GPUs faked as a custom resource."""

from __future__ import annotations

import pytest

pytest.importorskip("prefect_ray", reason="pip install prefect-ray")


@pytest.mark.slow
def test_sweep_runs_gpu_stages_on_ray_with_one_gpu_each(tiny_config):
    import ray

    from flows.sweep import lora_sweep

    execution = tiny_config.execution.model_copy(
        update={"runner": "ray", "ray_gpu_resource": "fake_gpu", "host_gpus": 1}
    )
    cfg = tiny_config.model_copy(update={"execution": execution})
    try:
        points = lora_sweep(cfg, [2, 4])
    finally:
        ray.shutdown()

    assert sorted(p.rank for p in points) == [2, 4]
    # one fake GPU in the cluster and each task asks for one: Ray must run them one after the other
    first, second = sorted(points, key=lambda p: p.started)
    assert first.finished <= second.started
