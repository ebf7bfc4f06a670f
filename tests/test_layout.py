"""qlora_flow.layout spells the keys that stores written by earlier releases hold: moving a key would orphan
every cached result and published run under the old one."""

from __future__ import annotations

from qlora_flow import layout

FP = "0123456789abcdef" * 4  # a 64-digit fingerprint


def test_cache_keys_are_the_ones_earlier_releases_wrote():
    assert layout.adapter_key(FP) == "cache/adapter/0123456789abcdef01234567"
    assert layout.trained_adapter_key(FP) == "cache/adapter/0123456789abcdef01234567/adapter"
    assert layout.adapter_checkpoints_key(FP) == "cache/adapter/0123456789abcdef01234567/checkpoints"
    assert layout.cache_key("eval", FP) == "cache/eval/0123456789abcdef01234567"
    assert layout.cache_key("merged", FP) == "cache/merged/0123456789abcdef01234567"
    assert layout.data_key(FP) == f"cache/data/{FP}"  # the full fingerprint, unlike the other caches
    assert layout.data_source_key("abc") == "cache/data-sources/abc.json"
    assert layout.adoption_key("adapter", FP) == "cache/adopted/adapter/0123456789abcdef01234567.json"
    assert layout.base_full_key(FP) == "cache/base/0123456789abcdef01234567/full"
    assert layout.base_nf4_key(FP, "fedcba9876543210" * 4) == "cache/base/0123456789abcdef01234567/nf4-fedcba9876543210"


def test_run_and_alias_keys_are_the_ones_consumers_read():
    assert layout.run_key("r1") == "runs/r1"
    assert layout.run_manifest_key("r1") == "runs/r1/manifest.json"
    assert layout.run_model_key("r1") == "runs/r1/model"
    assert layout.run_eval_key("r1") == "runs/r1/eval"
    assert layout.alias_key("extractor", "production") == "models/extractor/production.json"
    assert (layout.SAME_AS_NAME, layout.CLAIM_NAME, layout.ADAPTER_REF_NAME) == (
        "same-as.json",
        "flow-run.json",
        "adapter_ref.json",
    )
