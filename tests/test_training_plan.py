"""The profile planner: fastest profile that fits the memory budget, never one that does not."""

from __future__ import annotations

import pytest

from qlora_flow.training_plan import ModelShape, estimate_peak_gib, plan_training, resolve_packing

LLAMA3_8B = ModelShape(parameters=8_030_261_248, hidden_size=4096, num_layers=32, vocab_size=128_256)


def _plan(budget, **kw):
    args = dict(device="cuda", shape=LLAMA3_8B, max_seq_length=1024, batch_size=4, grad_accum=4)
    return plan_training(**{**args, **kw}, memory_budget_gib=budget)


def _planned_gib(plan, shape=LLAMA3_8B, seq=1024):
    """What the planner reserved for the plan: its estimate with the margin on activations."""
    tokens = plan.per_device_batch_size * seq
    return estimate_peak_gib(
        shape, tokens, plan.gradient_checkpointing, True, plan.compile_layers, plan.offload, margin=True
    )


def test_whole_h200_drops_checkpointing_and_keeps_the_global_batch():
    plan = _plan(139)
    assert not plan.gradient_checkpointing and plan.packing
    assert plan.per_device_batch_size * plan.gradient_accumulation_steps == 16
    assert plan.estimated_peak_gib < _planned_gib(plan) <= 139


@pytest.mark.parametrize("budget", [24, 40, 80])
def test_budget_is_respected_and_larger_budgets_never_plan_slower(budget):
    plan = _plan(budget)
    assert _planned_gib(plan) <= budget
    bigger = _plan(budget * 2)
    tokens = lambda p: p.per_device_batch_size  # noqa: E731 - same row length, so rows per micro-batch
    # more memory may only buy a bigger micro-batch or dropping checkpointing
    assert tokens(bigger) >= tokens(plan) or plan.gradient_checkpointing and not bigger.gradient_checkpointing


def test_40_gib_drops_checkpointing_for_a_smaller_micro_batch_as_measured():
    """Measured on an H200 (runs 17-18, Llama-3-8B shape, 40 GiB cap): 4 x 1,024 without checkpointing ran
    12,909 tok/s in 32.3 GiB reserved, 16 x 1,024 with checkpointing 10,245; 8 x 1,024 without it ran out."""
    plan = _plan(40)
    assert not plan.gradient_checkpointing and plan.per_device_batch_size == 4
    assert 32.3 <= plan.estimated_peak_gib <= _planned_gib(plan) <= 40
    assert estimate_peak_gib(LLAMA3_8B, 8192, False, True, compiled=True) > 40  # 8 rows: out of memory


def test_estimates_match_the_measured_peaks_within_the_safety_margin():
    # measured: 8.26 GiB (checkpointing, 4,096 tokens), 69.5 GiB (none, 8,192 tokens)
    assert 8.26 <= estimate_peak_gib(LLAMA3_8B, 4096, True, True) <= 8.26 / 0.85 * 1.2
    assert 69.5 <= estimate_peak_gib(LLAMA3_8B, 8192, False, True) <= 69.5 / 0.85


def test_cpu_keeps_the_configured_batch_and_no_checkpointing():
    plan = plan_training(device="cpu", shape=LLAMA3_8B, max_seq_length=512, batch_size=8, grad_accum=2)
    assert (plan.per_device_batch_size, plan.gradient_accumulation_steps) == (8, 2)
    assert not plan.gradient_checkpointing and not plan.packing


def test_forced_settings_win():
    plan = _plan(139, checkpointing="on", packing="off")
    assert plan.gradient_checkpointing and not plan.packing and plan.attn_implementation == "sdpa"


def test_ddp_splits_the_global_batch_over_gpus():
    """Adding GPUs must not change what a step learns: each of the 2 GPUs takes half of the 16 examples."""
    one, two = _plan(139), _plan(139, world_size=2)
    assert one.per_device_batch_size * one.gradient_accumulation_steps == 16
    assert two.per_device_batch_size * two.gradient_accumulation_steps * 2 == 16


def test_a_global_batch_that_does_not_split_over_the_gpus_is_refused():
    with pytest.raises(ValueError, match="cannot be split evenly over 3 GPUs"):
        _plan(139, world_size=3)


def test_compile_is_on_by_default_for_gpus_only_and_shrinks_the_memory_estimate():
    assert _plan(139).compile_layers and not _plan(139, compile_layers="off").compile_layers
    cpu = plan_training(device="cpu", shape=LLAMA3_8B, max_seq_length=512, batch_size=8, grad_accum=2)
    assert not cpu.compile_layers
    # measured at 8,192 tokens without checkpointing: 58.1 GiB compiled, 68.8 GiB eager
    assert 58.1 <= estimate_peak_gib(LLAMA3_8B, 8192, False, True, compiled=True) <= 58.1 / 0.85


def test_fused_lora_goes_with_compiled_layers_on_gpus_only():
    """Its dropout mask is hashing that only compiled layers fuse away (run 19: +3.5% on W1, whole H200)."""
    assert _plan(139).fused_lora and _plan(7).fused_lora
    assert not _plan(139, compile_layers="off").fused_lora
    cpu = plan_training(
        device="cpu", shape=LLAMA3_8B, max_seq_length=512, batch_size=8, grad_accum=2, compile_layers="on"
    )
    assert cpu.compile_layers and not cpu.fused_lora


def test_cpu_ranks_split_the_global_batch_too():
    plan = plan_training(device="cpu", shape=LLAMA3_8B, max_seq_length=512, batch_size=8, grad_accum=1, world_size=2)
    assert (plan.per_device_batch_size, plan.gradient_accumulation_steps) == (4, 1)


def test_7_gib_offloads_to_cpu_at_micro_batch_4_as_measured():
    """Measured on an H200 (runs 6-12): micro-batch 4 + checkpointing + offload peaked at 6.05-6.08 GiB
    allocated, 6.16-6.17 reserved (1.31-1.33x the baseline in run 12); without offload (8-bit Adam) and at
    micro-batch 8 with it, the same 7 GiB ran out of memory."""
    plan = _plan(7)
    assert plan.offload and plan.gradient_checkpointing and plan.per_device_batch_size == 4
    assert 6.05 <= plan.estimated_peak_gib <= _planned_gib(plan) <= 7
    assert estimate_peak_gib(LLAMA3_8B, 4096, True, True, compiled=True, margin=True) > 7  # without offload
    assert estimate_peak_gib(LLAMA3_8B, 8192, True, True, compiled=True, offload=True, margin=True) > 7


def test_offload_only_when_nothing_fits_without_it_and_only_if_allowed():
    assert not _plan(40).offload and not _plan(139).offload
    refused = _plan(7, offload="off")
    assert not refused.offload and refused.per_device_batch_size == 1  # the slow fallback it replaces (0.50x)
    forced = _plan(139, offload="on")
    assert forced.offload and forced.gradient_checkpointing  # offload moves checkpointed inputs: needs checkpointing
    cpu = plan_training(device="cpu", shape=LLAMA3_8B, max_seq_length=512, batch_size=8, grad_accum=2, offload="on")
    assert not cpu.offload


@pytest.mark.parametrize("budget", [8, 9, 10, 12, 16, 20, 24])
def test_auto_offloads_only_where_no_profile_fits_without_it(budget):
    without = _plan(budget, offload="off")
    fits_without = not without.reason.startswith("smallest profile")
    auto = _plan(budget)
    assert auto.offload is not fits_without
    if fits_without:
        assert auto == without


def test_an_explicit_checkpointing_off_is_kept_when_nothing_fits():
    plan = _plan(3, checkpointing="off")
    assert not plan.gradient_checkpointing and not plan.offload and plan.reason.startswith("smallest profile")
    assert _plan(3).gradient_checkpointing and _plan(3).offload  # auto: the smallest profile there is


def test_packing_auto_means_on_gpus_only():
    assert resolve_packing("auto", "cuda") and not resolve_packing("auto", "cpu")
    assert resolve_packing("on", "cpu") and not resolve_packing("off", "cuda")
    cpu = plan_training(device="cpu", shape=LLAMA3_8B, max_seq_length=512, batch_size=8, grad_accum=2)
    assert not cpu.packing and _plan(80).packing


def test_a_tied_embedding_is_the_lm_head_and_stays_on_the_gpu():
    tied = ModelShape(
        parameters=1_235_814_400, hidden_size=2048, num_layers=16, vocab_size=128_256, tied_embeddings=True
    )
    untied = ModelShape(parameters=1_235_814_400, hidden_size=2048, num_layers=16, vocab_size=128_256)
    table_gib = 128_256 * 2048 * 2 / 2**30
    saved_tied = estimate_peak_gib(tied, 4096, True, True) - estimate_peak_gib(tied, 4096, True, True, offload=True)
    saved_untied = estimate_peak_gib(untied, 4096, True, True) - estimate_peak_gib(
        untied, 4096, True, True, offload=True
    )
    assert saved_untied - saved_tied == pytest.approx(table_gib)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_step_arguments_build_the_trainer_s_checkpointing_without_deprecation_warnings(checkpointing, tmp_path):
    """transformers 5.25 warns on `gradient_checkpointing*` and TRL defaults it to True: the plan's choice must
    be what the trainer resolves, under whichever name the installed transformers has, with no FutureWarning."""
    import warnings

    from trl import SFTConfig

    from qlora_flow.recipe import step_arguments

    arguments = step_arguments(batch=2, accum=3, checkpointing=checkpointing, packing=True, offload=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **arguments)
    assert config.gradient_checkpointing is checkpointing  # the old name mirrors the new one where both exist
    assert getattr(config, "activation_checkpointing", checkpointing) is checkpointing
    kwargs = getattr(config, "activation_checkpointing_kwargs", config.gradient_checkpointing_kwargs)
    assert kwargs == ({"use_reentrant": False} if checkpointing else None)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (2, 3)
