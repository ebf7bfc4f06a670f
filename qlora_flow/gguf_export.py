"""Write a merged Llama-family model as a GGUF file (llama.cpp, Ollama, LM Studio), and check it.

Written with the `gguf` package (llama.cpp's own Python writer), following what llama.cpp's
convert_hf_to_gguf.py does for LlamaForCausalLM: the same tensor names (gguf.TensorNameMap), q/k
projections permuted to llama.cpp's rotary layout, norms kept in float32, the GPT-2 BPE vocabulary
with merges and token types, special tokens and the chat template. `q8_0` quantizes every 2-D weight
whose rows are a multiple of 32 with gguf.quants (the rest stay f16), as convert_hf_to_gguf does.

Anything outside that (another architecture, rope scaling, a non-BPE tokenizer, a pre-tokenizer
llama.cpp has no name for) raises GgufExportError with one line before a byte is written: a file
llama.cpp would load wrongly is worse than none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

QUANT_TYPES = ("f16", "q8_0")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


class GgufExportError(ValueError):
    """The model cannot be written as GGUF (yet); the message is one line saying why."""


def gguf_file_name(qtype: str) -> str:
    return f"model-{qtype}.gguf"


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise GgufExportError(f"rope scaling {rope_type!r} is not supported by the GGUF export yet (only plain RoPE)")
    return float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer, read from tokenizer.json (convert_hf_to_gguf hashes sample text instead)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [
        (s.get("type"), s.get("individual_digits"), s.get("use_regex", True), s.get("add_prefix_space")) for s in steps
    ]
    if kinds == [("ByteLevel", None, True, False)]:
        return "gpt-2"
    if kinds == [("Digits", True, True, None), ("ByteLevel", None, True, False)]:
        return "smollm"  # GPT-2's split after single digits: SmolLM/SmolLM2
    raise GgufExportError(
        f"pre-tokenizer {[k[0] for k in kinds]} has no llama.cpp name the export knows (gpt-2, smollm)"
    )


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf LlamaModel.permute)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def check_exportable(model_dir: Path) -> dict:
    """The model's config when it can be exported; GgufExportError (one line) when not."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    architectures = config.get("architectures") or ["(none)"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise GgufExportError(
            f"architecture {architectures[0]} cannot be exported to GGUF yet (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
            "set export.gguf: [] for this model"
        )
    _rope_theta(config)
    tokenizer_json = Path(model_dir) / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise GgufExportError(f"{model_dir} has no tokenizer.json; the GGUF export needs a fast BPE tokenizer")
    spec = json.loads(tokenizer_json.read_text())
    if spec["model"]["type"] != "BPE":
        raise GgufExportError(
            f"tokenizer model {spec['model']['type']} is not supported by the GGUF export yet (only GPT-2 style BPE)"
        )
    _pre_tokenizer_name(spec)
    return config


def _vocabulary(model_dir: Path, tokenizer) -> tuple[list[str], list[int], list[str]]:
    import gguf

    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(len(by_id)):
        token = by_id.get(i)
        if token is None:  # a hole in the id space: llama.cpp needs a placeholder
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, [int(t) for t in types], merges


def export_gguf(model_dir: Path, out_path: Path, qtype: str, name: str) -> Path:
    """Write model_dir (a saved LlamaForCausalLM + tokenizer) to out_path as GGUF `qtype`; atomic."""
    import gguf
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    if qtype not in QUANT_TYPES:
        raise GgufExportError(f"GGUF type {qtype!r} is not supported (choose from {', '.join(QUANT_TYPES)})")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = check_exportable(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    file_type = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0

    tmp = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    if head_dim != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)

    tokens, types, merges = _vocabulary(model_dir, tokenizer)
    if len(tokens) != config["vocab_size"]:
        raise GgufExportError(
            f"tokenizer has {len(tokens)} tokens but the model's embedding has {config['vocab_size']} rows"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(json.loads((model_dir / "tokenizer.json").read_text())))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(tokens))
    special.chat_template = None  # written below from the tokenizer, which also reads chat_template.jinja
    # say whether encoding starts with BOS, as the tokenizer does: llama.cpp's default differs per pre-tokenizer
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    special.add_special_token.setdefault("bos", adds_bos)
    special.add_to_gguf(writer, quiet=True)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as fh:
            for key in fh.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise GgufExportError(f"tensor {key} of {shard.name} has no GGUF name for the llama architecture")
                data = fh.get_tensor(key).to(torch.float32).numpy()
                if key.endswith("q_proj.weight"):
                    data = _permute(data, n_head, n_head)
                elif key.endswith("k_proj.weight"):
                    data = _permute(data, n_head, n_head_kv)
                if data.ndim == 1:  # norms: llama.cpp keeps them in float32
                    writer.add_tensor(target, data)
                elif qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
                    quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                    writer.add_tensor(target, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                else:
                    writer.add_tensor(target, data.astype(np.float16))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, out_path)
    return out_path


# ---------------------------------------------------------------- verification


def load_gguf(gguf_dir: Path, file_name: str):
    """The file read back with transformers' GGUF loader (dequantized to float32), model and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=file_name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gguf_dir, gguf_file=file_name)


def compare_models(
    reference, candidate, tokenizer, prompts: list[list[dict]], max_new_tokens: int, stop_ids: list[int], tie: float
) -> dict:
    """Greedy answers and logits of candidate vs reference on the same token ids (the reference's tokenizer).

    A greedy divergence counts as a tie, not a mismatch, where the reference's two candidate logits are
    within `tie` of each other (the same rule as the merge verification).
    """
    import torch

    max_diff, agree, positions, identical, ties, mismatches = 0.0, 0, 0, 0, 0, 0
    with torch.no_grad():
        for messages in prompts:
            prompt = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            ids = torch.tensor([prompt])
            answers = []
            for model in (reference, candidate):
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=tokenizer.pad_token_id,
                )
                answers.append(out[0, len(prompt) :].tolist())
            full = torch.tensor([prompt + answers[0]])
            ref_logits, got_logits = (m(input_ids=full).logits[0].float() for m in (reference, candidate))
            max_diff = max(max_diff, (got_logits - ref_logits).abs().max().item())
            agree += int((got_logits.argmax(-1) == ref_logits.argmax(-1)).sum())
            positions += ref_logits.shape[0]
            if answers[0] == answers[1]:
                identical += 1
                continue
            k = next((j for j, (a, b) in enumerate(zip(*answers)) if a != b), None)
            row = ref_logits[len(prompt) - 1 + k] if k is not None else None
            if row is not None and (row[answers[0][k]] - row[answers[1][k]]).item() <= tie:
                ties += 1
            else:
                mismatches += 1
    return {
        "prompts": len(prompts),
        "max_abs_logit_diff": max_diff,
        "top1_agreement": agree / max(positions, 1),
        "greedy_identical": identical,
        "greedy_tie_divergences": ties,
        "greedy_mismatches": mismatches,
    }
