"""qlora_flow/nf4_linear.py against bitsandbytes on this machine's device, eager and compiled: one JSON line per check.

The CPU tests (tests/test_nf4_linear.py) compare against bitsandbytes' CPU kernels; this compares against its
CUDA kernels at Llama-3-8B projection shapes before a `+torchnf4` row is trusted:

    python bench/check_nf4.py [--device cuda]     # exit 1 if any check fails

- dequantization: mismatching elements between `dequantize_nf4` and `bitsandbytes.functional.dequantize_4bit`
  (bf16, double quantization), eager (must be 0) and compiled (reported: a fused multiply-add may round the last
  bit differently; must stay under 1e-4 of the elements);
- matmul: a `Linear4bit` layer after `apply_torch_nf4` against the same layer's bitsandbytes forward, 8,192
  tokens, output and input gradient, relative error of the whole tensor (must stay under 1e-2: cuBLAS picks other
  kernels for other layouts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (out_features, in_features) of Llama-3-8B's projections: q/o, k/v, gate/up, down
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
MAX_COMPILED_MISMATCH = 1e-4
MAX_MATMUL_REL_ERROR = 1e-2


def _relative_error(ours, theirs) -> float:
    return ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()


def _nf4_layer(out_features: int, in_features: int, device: str):
    """A `bitsandbytes.nn.Linear4bit` as the 8B checkpoint has it (NF4, double quantization, bf16 compute)."""
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
    )
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.to(device).train()  # quantizes on `device`, with bitsandbytes' kernels there


def _output_and_input_grad(forward, x):
    import torch

    x = x.detach().requires_grad_(True)
    out = forward(x)
    (grad,) = torch.autograd.grad(out.float().square().sum(), x)
    return out, grad


def check(device: str, tokens: int) -> list[dict]:
    import bitsandbytes.functional as bnb_f
    import torch

    from qlora_flow.nf4_linear import apply_torch_nf4, dequantize_nf4, torch_path_covers

    torch.manual_seed(0)
    compiled = torch.compile(dequantize_nf4)
    rows = []
    for out_features, in_features in SHAPES:
        layer = _nf4_layer(out_features, in_features, device)
        packed, state = layer.weight.data, layer.weight.quant_state
        reference = bnb_f.dequantize_4bit(packed, state).to(torch.bfloat16)
        eager = dequantize_nf4(packed, state, torch.bfloat16)
        fused = compiled(packed, state, torch.bfloat16)
        x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16)
        expected, expected_grad = _output_and_input_grad(layer, x)
        assert apply_torch_nf4(layer) == 1
        ours, ours_grad = _output_and_input_grad(layer, x)
        row = {
            "device": torch.cuda.get_device_name() if device == "cuda" else device,
            "shape": [out_features, in_features],
            "torch_path": torch_path_covers(layer, x),  # not bitsandbytes' forward again through the fallback
            "eager_mismatches": int((eager.view(torch.int16) != reference.view(torch.int16)).sum()),
            "compiled_mismatch_share": round(
                (fused.view(torch.int16) != reference.view(torch.int16)).float().mean().item(), 8
            ),
            "matmul_rel_error": round(_relative_error(ours, expected), 6),
            "input_grad_rel_error": round(_relative_error(ours_grad, expected_grad), 6),
        }
        row["ok"] = (
            row["torch_path"]
            and row["eager_mismatches"] == 0
            and row["compiled_mismatch_share"] <= MAX_COMPILED_MISMATCH
            and row["matmul_rel_error"] <= MAX_MATMUL_REL_ERROR
            and row["input_grad_rel_error"] <= MAX_MATMUL_REL_ERROR
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    rows = check(args.device, args.tokens)
    sys.exit(0 if all(row["ok"] for row in rows) else 1)


if __name__ == "__main__":
    main()
