"""infra/: the files parse, point at code that exists, request GPUs and expose the right ports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from deployments.deploy import ENTRYPOINTS, K8S_TEMPLATE, PROCESS_POOL

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _placeholders(node) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_placeholders(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_placeholders(v) for v in node)) if node else set()
    return set(PLACEHOLDER.findall(node)) if isinstance(node, str) else set()


def test_deployment_entrypoints_exist():
    for entrypoint in ENTRYPOINTS.values():
        path, func = entrypoint.split(":")
        assert re.search(rf"^def {func}\(", (ROOT / path).read_text(), re.M), entrypoint


def test_k8s_job_template_requests_gpus_and_defines_every_variable():
    template = json.loads(K8S_TEMPLATE.read_text())
    variables = template["variables"]["properties"]
    assert _placeholders(template["job_configuration"]) <= set(variables), "placeholder without a variable"
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert variables["gpus"]["default"] >= 1 and variables["gpus"]["minimum"] >= 1
    assert container["image"] == "{{ image }}" and "image" in variables  # what `deploy(image=...)` needs
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["restartPolicy"] == "Never", "Prefect retries, not Kubernetes"
    dockerfile = (INFRA / "Dockerfile.gpu").read_text()
    assert f"WORKDIR {container['workingDir']}" in dockerfile, "entrypoints resolve from the image's project dir"


def test_gpu_image_uses_cuda_base_and_pinned_dependencies():
    dockerfile = (INFRA / "Dockerfile.gpu").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and re.search(r":\d+\.\d+\.\d+-", base), "pinned CUDA base"
    requirements = [
        line for line in (INFRA / "requirements-gpu.txt").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert requirements and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.+]+", r) for r in requirements), requirements
    pinned = {r.split("==")[0].lower() for r in requirements}
    assert {"torch", "prefect", "prefect-ray", "ray", "peft", "trl", "bitsandbytes", "transformers"} <= pinned
    assert "COPY infra/requirements-gpu.txt" in dockerfile and "-r infra/requirements-gpu.txt" in dockerfile
    for copied in re.findall(r"^COPY (\S+) \S+$", dockerfile, re.M):
        assert (ROOT / copied).exists(), f"Dockerfile copies missing {copied}"


def test_compose_stack_wires_server_postgres_minio_and_gpu_worker():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "worker"} <= set(services)
    server = services["prefect-server"]
    assert "4200:4200" in server["ports"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert {"9000:9000", "9001:9001"} <= set(services["minio"]["ports"])
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "infra/Dockerfile.gpu"
    assert (INFRA / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()
    assert worker["command"][worker["command"].index("--pool") + 1] == PROCESS_POOL
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
