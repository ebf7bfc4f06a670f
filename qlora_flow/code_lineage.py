"""Code lineage: earlier versions of the hashed code whose cached results today's code keeps using.

A stage fingerprint hashes the source of the modules that compute its result (`code_version`), so any edit
to one of them, even moving a function or reformatting, makes every cached result of that stage miss.
`GROUPS` names, per code group, the modules today's fingerprint hashes and the hashes of the versions a
developer declared to give the same results, oldest first; the last one is today's code. A stage that finds
nothing under today's fingerprint computes the fingerprints those earlier versions computed (same inputs,
earlier code hash) and adopts the first stored result that verifies (`find_result`): it records the earlier
fingerprint once under cache/adopted/<kind>/<fp>.json, logs one INFO line naming both, and uses the result
as stored, under the fingerprint it was stored with, so the caches keyed by it (the evaluation of that
adapter, its merge, the publication) keep matching. Nothing is copied; the record holds a fingerprint, not
a path, so it stays valid in a copied or moved store and on S3.

The rule. tests/test_code_lineage.py fails when a group's code is not the last hash of its lineage, and
prints the hash it found. After editing a module of a group:
  - results unchanged (a refactor, comments, formatting, a helper moved between modules of the group):
    append the new hash. Caches written by every version in the tuple stay in use.
  - results change (a step, a metric, a merge or an export computed differently): replace the tuple by the
    new hash alone. The stage computes every result again, on purpose.
A module added to or removed from a group changes its hash the same way. When today's code is not the
recorded last version (an edit not yet declared either way), nothing earlier is adopted.

Validation differs in one point: tasks/validate.py adopts an earlier data entry only when today's pass wrote
byte-identical splits and quarantine (the pass is cheap, and its versions do differ on some inputs: before
9eb6ee8 tool turns were rejected), so every earlier version can be listed there.

An earlier commit's hash is computed from a checkout of it (`git worktree add /tmp/old <commit>`) with that
commit's own `code_version` over the modules its fingerprint named (validation: `source_digest` of
qlora_flow/contracts.py, qlora_flow/readers.py, tasks/validate.py). Commits below are main's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from qlora_flow.fingerprint import code_version, source_digest
from qlora_flow.layout import adoption_key
from qlora_flow.store import ArtifactStore
from qlora_flow.training_backends import DEFAULT_BACKEND, backend_code_modules

log = logging.getLogger(__name__)

Found = TypeVar("Found")


@dataclass(frozen=True)
class CodeGroup:
    modules: tuple[str, ...]  # what today's fingerprint hashes
    lineage: tuple[str, ...]  # versions declared to give today's results, oldest first; the last is today's
    digest: Callable[..., str] = code_version


def training_modules(backend: str) -> tuple[str, ...]:
    """What the adapter fingerprint hashes for a training backend: its modules (for the default exactly
    qlora_flow.recipe) and those every backend trains with."""
    return (
        *backend_code_modules(backend),
        "qlora_flow.models",
        "qlora_flow.hardware",
        "qlora_flow.training_plan",
        "qlora_flow.training_template",
        "qlora_flow.fused_lora",
    )


GROUPS: dict[str, CodeGroup] = {
    # tasks/validate.py: part of the data fingerprint (and so of every fingerprint after it)
    "validation": CodeGroup(
        ("qlora_flow.contracts", "qlora_flow.readers", "tasks.validate"),
        (
            "3c9e6f0fab88426b655e29da4eb319a838c9b15222dc69074c28a9667679d391",  # 25b5f32 .. b2fe4c1
            "995a0ffe8f7920d4aebddae44dbc8042d5f35c1c98139a3dfa1afcd37c6d4cc5",  # f4cf18d .. 6c15c45
            "acbbc81f5382238196f932a73d37e8135956a3a30d7e605da5bbc8ea3be14e1a",  # 9eb6ee8
            "c33acf2277321a53ad061d0ba94357bffb38b2135e2c143cd6e4b1cce28152d5",  # 551919b
            "2d250ce867c8c3487998acd54fb54116b4a5a1694c54e624ad17f683efd8d890",  # 55b137c
            "626e5822029c611b382711d249f88fc174e50c95e4622e291397f139e0f5b873",  # 0507253
            "a5c270920204e2462a75bab1f162f4d627ada63061ee323b7cd99387a708a6a8",  # e68ccc1 .. c5b760c
            "c257af4ed67a8fcd847de608f38adaa4f9a55663048a6b23de64d040789d411b",  # compat: lookup adopts earlier entries
            # stricter reading of malformed files and the special-token check (some inputs now fail or quarantine
            # differently: an earlier entry is still kept only where today's pass writes the same bytes)
            "7f400381f861f0ee24ff0f38b3d2af21a0d126fa3915b634b83b8dc04b2f5496",
        ),
        digest=source_digest,
    ),
    # tasks/train.py training_fingerprint, with the default backend (trl); another backend has no earlier versions
    "training": CodeGroup(
        training_modules(DEFAULT_BACKEND),
        (
            # until the refactor the recipe was in tasks/train.py: tasks.train, .models, .hardware, .training_plan;
            # the edits after 25b5f32 were logging, resume and process handling, and the DoRA/rsLoRA options
            # (plain LoRA passes peft's defaults). Each version trains the tiny test model to the same bytes.
            "038af1992a546545",  # 25b5f32 .. 9afd076
            "929ed6f5a5d59151",  # b2fe4c1
            "677fc50ac79f73d6",  # f4cf18d .. bdd1e3b
            "df05a75854a34865",  # 6c15c45
            "2ed7f6b6735e29b0",  # 9eb6ee8
            "e4d6b66ebc3b2029",  # 551919b
            # the refactor (issue 16) moved the recipe to qlora_flow/recipe.py and training_template.py
            "6a2342c30f068a02",  # 55b137c
            "5c5f9caacaa164ac",  # 0507253 .. c5b760c (ruff format: same syntax tree as 55b137c)
            # the planner's fixed cost per micro-batch refitted: it picks how a step is split and recomputed, which
            # the fingerprint leaves out as not changing the weights (memory_budget_gib, gradient_checkpointing)
            "90b1308ce9568bad",  # f3d984d
            "d9c11e7a7d58a132",  # 011f70d (backend switch: torch imported lazily in qlora_flow/hardware.py)
            "8592cd5f3bb184bd",  # the `# fmt: skip` markers dropped, ruff format (same syntax trees)
            # qlora_flow/fused_lora.py, planned with compiled layers on GPUs only: on the CPU the same bytes; on a
            # GPU the same update with dropout masks drawn from its hash instead of torch's generator (GPU runs
            # were never bit-reproducible across versions), so GPU adapters of earlier versions stay in use too
            "8bdf3e3fca933218",
            "c3a9782e6bb9ca57",  # the fused update's mask hash in 32-bit arithmetic (GPU masks only, as above)
            # transformers 5.25's activation_checkpointing* names for the same checkpointing setting, where it has them
            "fe93f1ed4b950dba",
        ),
    ),
    # qlora_flow/stage_cache.py evaluation_fingerprint
    "evaluation": CodeGroup(
        ("tasks.evaluate", "qlora_flow.metrics", "qlora_flow.models", "qlora_flow.stage_inputs"),
        (
            "766fe1ea68257533",  # 551919b: tasks.evaluate, .metrics, .models
            "272bb676fe772bfb",  # 55b137c: input readers moved to qlora_flow/stage_inputs.py
            "6c9a058da3e2b51e",  # 0507253 .. c5b760c (ruff format)
            "ad2124dbd61968ff",  # compat: lookup adopts earlier entries
            "7e9f09ab766af4b3",  # the `# fmt: skip` markers dropped, ruff format (same syntax trees)
        ),
    ),
    # qlora_flow/stage_cache.py merge_fingerprint
    "merge": CodeGroup(
        ("tasks.merge", "qlora_flow.models", "qlora_flow.stage_inputs", "qlora_flow.training_template"),
        (
            "5a734344aac87740",  # 551919b: tasks.merge, .models
            "0a2627e3c0426129",  # 55b137c: readers and the training-mask check moved to qlora_flow/
            "0900a93ee16fac99",  # 0507253 .. c5b760c (ruff format)
            "6a01b340268d028d",  # compat: lookup adopts earlier entries
            "94636672120b3014",  # the `# fmt: skip` markers dropped, ruff format (same syntax trees)
        ),
    ),
    # tasks/export_gguf.py gguf_fingerprints
    "gguf": CodeGroup(
        ("qlora_flow.gguf_export", "tasks.export_gguf"),
        (
            "d8e7bcdf00c8ca0e",  # 9eb6ee8 .. 551919b
            "f516c9aaadd81d56",  # 55b137c: its key from qlora_flow/layout.py
            "bf7290085236d039",  # 0507253 .. c5b760c (ruff format)
            "c16c972bd16a201c",  # compat: lookup adopts earlier entries
            "c0faa98069a3403d",  # the `# fmt: skip` markers dropped, ruff format (same syntax trees)
        ),
    ),
}


def code_hash(group: str) -> str:
    """The hash of today's source of the group's modules."""
    found = GROUPS[group]
    return found.digest(*found.modules)


def code_hashes(group: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """Today's hash first, then the earlier versions declared equivalent, newest first; today's alone while
    today's code is not the recorded last version. Other `modules` than the group's (a training backend other
    than the default) are code with no earlier version declared."""
    found = GROUPS[group]
    if modules is not None and modules != found.modules:
        return [found.digest(*modules)]
    current = code_hash(group)
    if found.lineage[-1] != current:
        return [current]
    return [current, *reversed(found.lineage[:-1])]


def log_adoption(kind: str, earlier: str, current: str, record_uri: str) -> None:
    log.info(
        "%s cache: fingerprint %s has no entry; adopting the one stored under fingerprint %s by an earlier "
        "version of the code (qlora_flow/code_lineage.py), recorded in %s",
        kind,
        current[:24],
        earlier[:24],
        record_uri,
    )


def _recorded(store: ArtifactStore, record: str) -> str | None:
    try:
        return store.read_json(record)["fingerprint"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:  # damaged: looked up again and rewritten
        log.warning("adoption record %s is unreadable (%s); looking for the entry again", store.uri(record), exc)
        return None


def find_result(
    store: ArtifactStore, kind: str, fingerprints: Sequence[str], load: Callable[[str], Found | None]
) -> tuple[str, Found] | None:
    """The stored result for fingerprints[0] (today's code) and the fingerprint it is stored under, or None.

    Tried in order: today's entry; the earlier one its adoption record names; the first earlier one
    (fingerprints[1:], code declared equivalent) that loads, which is then recorded. `load(fp)` returns
    the verified entry or None; a corrupt one is quarantined by the store's check and the next one tried."""
    current, earlier = fingerprints[0], list(fingerprints[1:])
    found = load(current)
    if found is not None:
        return current, found
    record = adoption_key(kind, current)
    named = _recorded(store, record)
    if named in earlier:
        found = load(named)
        if found is not None:
            return named, found
    for fingerprint in earlier:
        if fingerprint == named:
            continue
        found = load(fingerprint)
        if found is not None:
            store.write_json(record, {"fingerprint": fingerprint})
            log_adoption(kind, fingerprint, current, store.uri(record))
            return fingerprint, found
    return None
