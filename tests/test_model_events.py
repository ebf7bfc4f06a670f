"""Model event resources name the store as well as the model, and carry the alias a run would move."""

from __future__ import annotations

from pathlib import Path

from qlora_flow.config import PipelineConfig
from qlora_flow.model_events import model_resource, store_identity


def _cfg(**sections) -> PipelineConfig:
    return PipelineConfig.model_validate({"publish": {"model_name": "orders"}, **sections})


def test_one_resource_per_store_and_model(tmp_path):
    local = model_resource(_cfg(execution={"store": "artifacts"}), workdir=tmp_path)
    same = model_resource(_cfg(execution={"store": str(tmp_path / "artifacts")}))
    elsewhere = model_resource(_cfg(execution={"store": "artifacts"}), workdir=tmp_path / "other")
    assert local["prefect.resource.id"] == same["prefect.resource.id"] != elsewhere["prefect.resource.id"]
    assert local["prefect.resource.id"].startswith("qlora-flow.model.") and local["prefect.resource.id"].endswith(
        ".orders"
    )
    assert local["qlora-flow.store"] == (tmp_path / "artifacts").as_uri() and local["qlora-flow.alias"] == "production"

    aws = store_identity(_cfg(execution={"store": "s3://models/prod/"}).execution)
    minio = store_identity(
        _cfg(execution={"store": "s3://models/prod", "s3": {"endpoint_url": "http://minio:9000"}}).execution
    )
    assert aws[1] == minio[1] == "s3://models/prod" and aws[0] != minio[0]  # same bucket name, different servers


def test_alias_label_only_when_the_run_publishes(tmp_path):
    experiment = model_resource(_cfg(publish={"model_name": "orders", "alias": "experiment"}), Path(tmp_path))
    off = model_resource(_cfg(publish={"model_name": "orders", "enabled": False}), Path(tmp_path))
    assert experiment["qlora-flow.alias"] == "experiment" and "qlora-flow.alias" not in off
