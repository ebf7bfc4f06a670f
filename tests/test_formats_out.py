"""What users take away: GGUF files and the servable adapter, published in the manifest and pulled on their own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_flow.cli import main
from qlora_flow.fingerprint import sha256_file
from qlora_flow.gguf_export import (
    GgufExportError,
    _pre_tokenizer_name,
    compare_models,
    export_gguf,
    load_gguf,
)
from qlora_flow.refs import EvalReport, GateVerdict
from tasks.export_gguf import export_gguf_files
from tasks.merge import merge_adapter
from tasks.publish import publish_run
from tests.conftest import make_chat_rows
from tests.test_evaluate_support import (  # noqa: F401
    N_EVAL,
    run_inputs,
    tiny_adapter_dir,
)


def _report(store) -> EvalReport:
    store.write_json("cache/eval/t/report.json", {"tuned": {"loss": 1.0}})
    store.write_bytes("cache/eval/t/samples.jsonl", b"{}\n")
    store.commit("cache/eval/t")
    return EvalReport(
        uri=store.uri("cache/eval/t/report.json"),
        base_metrics={"loss": 2.0},
        tuned_metrics={"loss": 1.0},
        samples_uri=store.uri("cache/eval/t/samples.jsonl"),
        verdict=GateVerdict(passed=True, reasons=[]),
    )


def _pull(store_root: Path, dest: Path, *flags: str) -> Path:
    assert main(["pull", "tiny:production", str(dest), "--store", str(store_root), *flags]) == 0
    return dest


@pytest.mark.slow  # ~50 s of CPU: a merge, two exports and their checks, publish, three pulls
def test_gguf_and_adapter_are_published_and_pulled_and_behave_like_the_merged_model(
    tiny_config, run_inputs, tiny_model_dir, tmp_path
):
    from peft import PeftModel

    cfg, r = tiny_config, run_inputs
    cfg.publish.model_name = "tiny"
    cfg.merge.min_top1_agreement = 0.95  # bf16 rounding flips some of the random tiny model's near-ties
    cfg.export.gguf = ["f16", "q8_0"]
    r.store.write_json("cache/data/tiny/report.json", {"n_rejected": 0})
    merged = merge_adapter(cfg, r.store, "run-g", r.base, r.adapter, data=r.data)
    exported = export_gguf_files(cfg, r.store, merged, r.data)

    f16, q8 = exported.verification["f16"], exported.verification["q8_0"]
    assert f16["prompts"] == 2 and f16["greedy_identical"] == 2 and f16["max_abs_logit_diff"] < 1e-3
    assert q8["top1_agreement"] >= cfg.export.q8_0_min_top1_agreement
    assert f16["tokenizer_same_ids"] and f16["same_chat_template"]
    assert q8["bytes"] < f16["bytes"]
    print("GGUF verification (tiny):", json.dumps(exported.verification, sort_keys=True))
    f16_file = Path(exported.uri) / "model-f16.gguf"
    written = f16_file.stat().st_mtime_ns
    assert export_gguf_files(cfg, r.store, merged, r.data) == exported  # same merge: reused, not rewritten
    assert f16_file.stat().st_mtime_ns == written

    publish_run(
        cfg,
        r.store,
        "run-g",
        merged=merged,
        adapter=r.adapter,
        report=_report(r.store),
        data=r.data,
        base=r.base,
        gguf=exported,
    )
    run_dir = r.store.path / "runs/run-g"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    for name in (
        "gguf/model-f16.gguf",
        "gguf/model-q8_0.gguf",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/README.md",
    ):
        assert listed[name] == sha256_file(run_dir / name), name

    store_root = r.store.path
    gguf_dir = _pull(store_root, tmp_path / "gguf", "--format", "gguf")
    assert sorted(p.name for p in gguf_dir.iterdir()) == [
        "manifest.json",
        "model-f16.gguf",
        "model-q8_0.gguf",
        "verification.json",
    ]
    model_dir = _pull(store_root, tmp_path / "model")
    adapter_dir = _pull(store_root, tmp_path / "adapter", "--adapter")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {p.name for p in adapter_dir.iterdir()}
    assert not list(adapter_dir.glob("model*.safetensors"))
    card = yaml.safe_load((adapter_dir / "README.md").read_text().split("---\n")[1])
    assert card["qlora_flow"]["base_fingerprint"] == r.base.fingerprint and card["base_model"] == r.base.model_id

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = [row["messages"][:-1] for row in make_chat_rows(N_EVAL, seed=1)[:3]]
    served = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    from_gguf, _ = load_gguf(gguf_dir, "model-f16.gguf")
    assert compare_models(served, from_gguf, tokenizer, prompts, 16, stop, 0.0)["greedy_identical"] == 3
    # the pulled adapter on the tiny 16-bit base behaves like the pulled merged model (bf16 rounding apart)
    on_base = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter_dir
    ).eval()
    result = compare_models(served, on_base, tokenizer, prompts, 16, stop, 2e-2)
    assert result["greedy_mismatches"] == 0 and result["max_abs_logit_diff"] < 2e-2, result


def test_unsupported_architecture_fails_with_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(GgufExportError) as info:
        export_gguf(model_dir, tmp_path / "out.gguf", "f16", "x")
    assert "\n" not in str(info.value) and "MistralForCausalLM cannot be exported to GGUF" in str(info.value)
    assert not list(tmp_path.glob("out.gguf*"))


@pytest.mark.parametrize(
    ("pre_tokenizer", "name"),
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
                ],
            },
            "smollm",
        ),
        ({"type": "Metaspace"}, None),
        ({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, None),
    ],
)
def test_pre_tokenizer_names_llama_cpp_knows(pre_tokenizer, name):
    if name is None:
        with pytest.raises(GgufExportError, match="no llama.cpp name"):
            _pre_tokenizer_name({"pre_tokenizer": pre_tokenizer})
    else:
        assert _pre_tokenizer_name({"pre_tokenizer": pre_tokenizer}) == name


@pytest.mark.slow  # the real SmolLM2-135M: GGUF import, NF4 quantization, f16 export and its check
def test_demo_config_smollm2_exports_an_f16_gguf_with_the_same_greedy_answers(tmp_path, monkeypatch):
    """The demo config's export on the real base (its 16-bit import stands in for the merge, which it equals
    in shape, tokenizer and template); the full demo run's numbers are in the README."""
    from qlora_flow.config import load_config
    from qlora_flow.models import load_tokenizer_for
    from qlora_flow.refs import MergedModel
    from qlora_flow.store import LocalStore
    from tasks.prepare_base import prepare_base_model
    from tasks.validate import validate_dataset

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    cfg = load_config(
        root / "configs/demo.yaml",
        {"execution.store": str(tmp_path / "store"), "merge.verify_prompts": 2, "evaluation.max_new_tokens": 24},
    )
    assert "f16" in cfg.export.gguf
    cfg.export.gguf = ["f16"]
    store = LocalStore(cfg.execution.store)
    data = validate_dataset(cfg, store, load_tokenizer_for(cfg.base_model))
    base = prepare_base_model(cfg, store)
    stand_in = MergedModel(uri=base.full_precision_uri, fingerprint=base.fingerprint, dtype="bfloat16", verification={})
    exported = export_gguf_files(cfg, store, stand_in, data)
    f16 = exported.verification["f16"]
    print("SmolLM2 f16 GGUF:", json.dumps(f16, sort_keys=True))
    assert f16["greedy_identical"] == f16["prompts"] == 2 and f16["tokenizer_same_ids"] and f16["same_chat_template"]
