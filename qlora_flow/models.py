"""Resolving and loading models: the one place that knows about GGUF files, hub ids and NF4.

Sources a base model may come from:
  pkg:<python package>/<file.gguf>   a GGUF file shipped inside an installed package (the offline demo)
  /path/to/model.gguf                a GGUF file
  /path/to/hf-model-dir              a Hugging Face model directory
  s3://bucket/prefix                 a Hugging Face model directory in object storage
  org/name                           a hub id (needs network access to the hub)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from qlora_flow.config import BaseModelConfig, QuantizationConfig
from qlora_flow.fingerprint import combine, hash_tree, sha256_file
from qlora_flow.sources import ModelSource, resolve_source


def source_fingerprint(base: BaseModelConfig, source: ModelSource) -> str:
    """Content hash of what the base model is made of (hub ids: id + revision, the best we can know offline)."""
    if source.kind == "gguf":
        content = sha256_file(Path(source.location) / source.gguf_file)
    elif source.kind == "dir":
        content = hash_tree(source.location)
    else:
        content = f"{source.location}@{base.revision or 'main'}"
    return combine("base-model", content, base.tokenizer_id)


def load_tokenizer_for(base: BaseModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer (with chat template) that belongs to a base model config, without loading weights."""
    source = resolve_source(base)
    if base.tokenizer_id:
        return AutoTokenizer.from_pretrained(base.tokenizer_id, revision=base.revision)
    if source.kind == "gguf":
        return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    if source.kind == "s3":
        raise ValueError("base_model.id on s3:// needs prepare_base_model first; load the tokenizer from its output")
    return AutoTokenizer.from_pretrained(
        source.location, revision=base.revision, trust_remote_code=base.trust_remote_code
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_source_model(base: BaseModelConfig, source: ModelSource, local_dir: str | None = None):
    """Weights from any source, de-quantized to 16 bits (GGUF files are de-quantized by transformers)."""
    kwargs = {"revision": base.revision, "trust_remote_code": base.trust_remote_code}
    if source.kind == "gguf":
        # GGUF de-quantization runs fastest in float32; the 16-bit cast happens after.
        model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32)
        model = model.to(torch.bfloat16)
        # The tensors are already de-quantized; dropping the GGUF marker makes the model a plain 16-bit one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model
    location = local_dir or source.location
    return AutoModelForCausalLM.from_pretrained(location, dtype=torch.bfloat16, **kwargs)


def bnb_config(quant: QuantizationConfig, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_target(device: str) -> int | str:
    """Where `device_map` puts a model: on a GPU, the current one (each DDP rank's own under torchrun, which
    tasks/train.py sets; the leased one in a flow run, see qlora_flow.gpu_runner), never a fixed index 0."""
    return torch.cuda.current_device() if device == "cuda" else "cpu"


def load_nf4_model(
    path: str | Path,
    compute_dtype: torch.dtype,
    device: str,
    quant: QuantizationConfig | None = None,
    attn_implementation: str | None = None,
):
    """Load a 4-bit model: a serialized NF4 checkpoint directly, or quantize a 16-bit one on the fly."""
    kwargs: dict = {"dtype": compute_dtype, "device_map": {"": load_target(device)}}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = bnb_config(quant, compute_dtype)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_full_precision_model(
    path: str | Path, dtype: torch.dtype, device: str = "cpu", attn_implementation: str | None = None
):
    """The 16-bit base (or merged model) at the dtype we compute in; never quantized (merges happen here)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device)


def chatml_training_template(template: str) -> str | None:
    """A ChatML template with `{% generation %}` markers around assistant turns, end-of-turn token included.

    TRL patches the templates it knows; SmolLM2's ChatML template is not among them. The markers let
    TRL compute the loss on assistant tokens only, and keeping `<|im_end|>` inside them trains the stop.
    """
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        return None
    # Keep the model's own default-system-prompt block verbatim so training renders what inference renders.
    match = re.search(
        r"\{% if loop\.first and messages\[0\]\['role'\] != 'system' %\}.*?\{% endif %\}", template, re.DOTALL
    )
    system_block = match.group(0) if match else ""
    return (
        "{% for message in messages %}" + system_block + "{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\\n' }}{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: EOS plus the chat template's end-of-turn marker if different."""
    ids = {tokenizer.eos_token_id}
    for candidate in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(candidate)
        if (
            isinstance(token_id, int)
            and token_id != tokenizer.unk_token_id
            and candidate in (tokenizer.chat_template or "")
        ):
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


__all__ = [
    "ModelSource",
    "bnb_config",
    "chatml_training_template",
    "end_of_turn_token_ids",
    "load_full_precision_model",
    "load_nf4_model",
    "load_source_model",
    "load_tokenizer",
    "load_tokenizer_for",
    "resolve_source",
    "source_fingerprint",
]
