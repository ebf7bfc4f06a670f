"""The dataset validation stage: contract checks, formats, splits, quarantine, fingerprint, caching."""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TOKENIZER_DIR, make_chat_rows
from transformers import AutoTokenizer

from qlora_flow.config import ConfigError, load_config
from qlora_flow.store import LocalStore
from tasks import validate as validate_mod
from tasks.validate import DataValidationError, validate_dataset

MALFORMED = Path(__file__).parent / "data" / "malformed"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture
def make_cfg(tmp_path):
    def make(train_path, **overrides):
        values = {
            "data.train_path": str(train_path),
            "data.min_train_rows": 1,
            "training.max_seq_length": 128,
            "execution.store": str(tmp_path / "store"),
        }
        values.update({k if "." in k else f"data.{k}": v for k, v in overrides.items()})
        return load_config(None, values)

    return make


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_split(uri: str) -> list[list[dict]]:
    return pq.read_table(uri).column("messages").to_pylist()


def quarantine_of(report_uri: str) -> list[dict]:
    path = Path(report_uri).with_name("quarantine.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ the malformed corpus

# file -> the rows it must quarantine, each with the exact set of checks it breaks
ROW_CASES = {
    "broken_json.jsonl": {2: {"parse"}},
    "not_object.jsonl": {2: {"row_type"}},
    "latin1_bytes.jsonl": {2: {"encoding"}},
    "control_char.jsonl": {2: {"control_chars"}},
    "nul_byte.jsonl": {2: {"control_chars"}},
    "carriage_return.jsonl": {2: {"control_chars"}},
    "whitespace_reply.jsonl": {2: {"empty_content"}},
    "empty_user.jsonl": {2: {"empty_content"}},
    "content_not_string.jsonl": {2: {"type"}},
    "role_not_string.jsonl": {2: {"type"}},
    "unknown_role.jsonl": {2: {"role"}},
    "missing_content_key.jsonl": {2: {"missing_field"}},
    "missing_messages_field.jsonl": {2: {"missing_field"}},
    "messages_not_list.jsonl": {2: {"messages_type"}},
    "messages_empty_list.jsonl": {2: {"messages_type"}},
    "turn_not_object.jsonl": {2: {"messages_type"}},
    "last_turn_user.jsonl": {2: {"last_turn"}},
    "system_in_middle.jsonl": {2: {"system_position"}},
    "user_twice.jsonl": {2: {"role_order"}},
    "assistant_first.jsonl": {2: {"role_order"}},
    "overlength.jsonl": {2: {"overlength"}},
    "exact_duplicate.jsonl": {3: {"duplicate"}},
    "near_duplicate.jsonl": {3: {"near_duplicate"}},
    "null_completion.jsonl": {2: {"missing_field"}},
    "short_row.csv": {3: {"missing_field"}},  # CSV rows are numbered by line: the header is line 1
    "extra_cells.csv": {3: {"parse"}},
    "latin1_prompt.csv": {3: {"encoding"}},
    "output_not_string.json": {2: {"type"}},
}

# the field each row-level failure must name (where the rule is about one field)
FIELDS = {
    "latin1_bytes.jsonl": "messages[0].content",
    "content_not_string.jsonl": "messages[1].content",
    "role_not_string.jsonl": "messages[0].role",
    "missing_content_key.jsonl": "messages[0].content",
    "system_in_middle.jsonl": "messages[1].role",
    "last_turn_user.jsonl": "messages[2].role",
    "null_completion.jsonl": "completion",
    "latin1_prompt.csv": "prompt",
    "output_not_string.json": "output",
    "whitespace_reply.jsonl": "messages[1].content",
}

FILE_CASES = {
    "empty.jsonl": "empty_file",
    "blank_lines.jsonl": "empty_file",
    "header_only.csv": "empty_file",
    "unknown_columns.csv": "missing_columns",
    "notes.txt": "unknown_format",
    "top_level_string.json": "row_type",
    "broken.json": "parse",
    "not_parquet.parquet": "parse",
}


def test_corpus_is_complete():
    on_disk = {p.name for p in MALFORMED.iterdir()} - {"make_corpus.py", "leakage_eval.jsonl"}
    assert on_disk == set(ROW_CASES) | set(FILE_CASES) | {"leakage_train.jsonl", "too_few_rows.jsonl"}
    assert len(on_disk) >= 25


@pytest.mark.parametrize("name", sorted(ROW_CASES))
def test_malformed_row_is_quarantined_with_its_check(name, make_cfg, store, tokenizer):
    path = MALFORMED / name
    with pytest.raises(DataValidationError) as info:
        validate_dataset(make_cfg(path), store, tokenizer)
    expected = ROW_CASES[name]
    err = info.value
    assert {c for checks in expected.values() for c in checks} <= set(err.checks)
    assert err.checks["rejected_fraction"] == len(expected)
    quarantined = quarantine_of(err.report["report_uri"])
    assert {q["row"]: {r["check"] for r in q["reasons"]} for q in quarantined} == expected
    assert all(q["file"] == str(path) for q in quarantined)
    first_row = min(expected)
    assert f"{path}:{first_row}" in str(err)
    if name in FIELDS:
        assert quarantined[0]["reasons"][0]["field"] == FIELDS[name]
        assert FIELDS[name] in str(err)
    # nothing lost: the accepted rows plus the quarantine are the whole input
    report = err.report
    assert report["n_train"] + report["n_eval"] + len(quarantined) == report["n_input_rows"]


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_malformed_file_fails_with_its_check(name, make_cfg, store, tokenizer):
    path = MALFORMED / name
    with pytest.raises(DataValidationError) as info:
        validate_dataset(make_cfg(path), store, tokenizer)
    assert info.value.checks == {FILE_CASES[name]: 1}
    assert str(path) in str(info.value)
    assert store.list("cache") == []  # a file-level failure writes nothing


def test_leakage_from_eval_file_into_train(make_cfg, store, tokenizer):
    cfg = make_cfg(MALFORMED / "leakage_train.jsonl", eval_path=str(MALFORMED / "leakage_eval.jsonl"))
    with pytest.raises(DataValidationError) as info:
        validate_dataset(cfg, store, tokenizer)
    quarantined = quarantine_of(info.value.report["report_uri"])
    # both train rows asking the eval prompt (verbatim and with other case/spacing) leak
    assert {(q["split"], q["row"]) for q in quarantined} == {("train", 2), ("train", 3)}
    assert {r["check"] for q in quarantined for r in q["reasons"]} == {"leakage"}
    assert info.value.report["n_eval"] == 1 and info.value.report["n_train"] == 1


def test_too_few_rows_fails_min_rows(make_cfg, store, tokenizer):
    with pytest.raises(DataValidationError) as info:
        validate_dataset(make_cfg(MALFORMED / "too_few_rows.jsonl", min_train_rows=8), store, tokenizer)
    assert info.value.checks == {"min_rows": 1}
    assert "train split has" in str(info.value) and "min_train_rows is 8" in str(info.value)


# ------------------------------------------------------------------ nothing lost, thresholds


def mixed_rows() -> tuple[list, dict[int, str]]:
    rows: list = make_chat_rows(40)
    bad = {
        5: ("{not json", "parse"),
        12: ({"messages": [{"role": "user", "content": "only a question"}]}, "last_turn"),
        20: (rows[3], "duplicate"),
        33: ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}, "empty_content"),
    }
    for line in sorted(bad):
        rows.insert(line - 1, bad[line][0])
    return rows, {line: check for line, (_, check) in bad.items()}


def write_mixed(path: Path) -> tuple[Path, dict[int, str]]:
    rows, bad = mixed_rows()
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path, bad


def test_quarantine_holds_exactly_the_rejected_rows(tmp_path, make_cfg, store, tokenizer):
    path, bad = write_mixed(tmp_path / "mixed.jsonl")
    result = validate_dataset(make_cfg(path, max_rejected_fraction=0.2, eval_fraction=0.25), store, tokenizer)
    assert result.n_input_rows == 44 and result.n_rejected == 4
    assert result.n_train + result.n_eval + result.n_rejected == result.n_input_rows
    assert result.n_eval > 0 and result.n_train > 0
    quarantined = quarantine_of(result.report_uri)
    assert {q["row"]: q["reasons"][0]["check"] for q in quarantined} == bad
    lines = path.read_text().splitlines()
    for q in quarantined:  # the raw row is kept as read, so it can be fixed and replayed
        assert q["raw"] == (lines[q["row"] - 1] if q["row"] == 5 else json.loads(lines[q["row"] - 1]))
    assert result.quarantine_uri == str(Path(result.report_uri).with_name("quarantine.jsonl"))
    accepted = read_split(result.train_uri) + read_split(result.eval_uri)
    assert len(accepted) == 40
    assert sorted(map(json.dumps, accepted)) == sorted(json.dumps(r["messages"]) for r in make_chat_rows(40))
    report = json.loads(Path(result.report_uri).read_text())
    assert report["checks"] == {"duplicate": 1, "empty_content": 1, "last_turn": 1, "parse": 1}


def test_failing_run_still_writes_quarantine_and_report(tmp_path, make_cfg, store, tokenizer):
    path, bad = write_mixed(tmp_path / "mixed.jsonl")
    with pytest.raises(DataValidationError) as info:
        validate_dataset(make_cfg(path), store, tokenizer)
    message = str(info.value)
    assert "4 of 44 rows rejected" in message
    for check in ("duplicate", "empty_content", "last_turn", "parse"):
        assert f"  {check}: 1 (" in message
    assert f"{path}:5 (row) [parse]" in message
    assert f"{path}:12 messages[0].role [last_turn]" in message
    assert len(quarantine_of(info.value.report["report_uri"])) == 4
    assert Path(info.value.report["report_uri"]).is_file()


def test_cache_hit_reuses_outputs_and_re_applies_thresholds(tmp_path, make_cfg, store, tokenizer, monkeypatch):
    path, _ = write_mixed(tmp_path / "mixed.jsonl")
    with pytest.raises(DataValidationError):
        validate_dataset(make_cfg(path), store, tokenizer)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(validate_mod, "_validate_into", no_second_pass)
    # same data, looser threshold: the stored result now passes without re-validating
    result = validate_dataset(make_cfg(path, max_rejected_fraction=0.1), store, tokenizer)
    assert result.n_rejected == 4
    assert len(store.list("cache/data")) == 5  # one entry: train, eval, quarantine, report, marker


def test_cross_chunk_duplicates(tmp_path, make_cfg, store, tokenizer, monkeypatch):
    monkeypatch.setattr(validate_mod, "CHUNK_ROWS", 7)
    rows = make_chat_rows(30)
    rows += [
        rows[2],
        {"messages": [{"role": m["role"], "content": m["content"].upper()} for m in rows[25]["messages"]]},
    ]
    result = validate_dataset(
        make_cfg(write_jsonl(tmp_path / "d.jsonl", rows), max_rejected_fraction=0.1), store, tokenizer
    )
    assert {q["row"]: q["reasons"][0]["check"] for q in quarantine_of(result.report_uri)} == {
        31: "duplicate",
        32: "near_duplicate",
    }
    assert result.n_train + result.n_eval == 30


# ------------------------------------------------------------------ formats, shapes, fingerprint


def write_all_formats(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    import pandas as pd
    from datasets import Dataset

    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(rows))
    paths["csv"] = tmp_path / "d.csv"
    pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in rows]}).to_csv(paths["csv"], index=False)
    paths["parquet"] = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(paths["parquet"])
    paths["hf_disk"] = tmp_path / "hf"
    Dataset.from_list(rows).save_to_disk(str(paths["hf_disk"]))
    return paths


def test_fingerprint_is_format_and_order_independent(tmp_path, make_cfg, store, tokenizer):
    rows = make_chat_rows(30)
    results = {
        fmt: validate_dataset(make_cfg(p), store, tokenizer) for fmt, p in write_all_formats(tmp_path, rows).items()
    }
    assert {r.source_format for r in results.values()} == {"jsonl", "json", "csv", "parquet", "hf_disk"}
    assert len({r.fingerprint for r in results.values()}) == 1
    assert {(r.n_train, r.n_eval, r.n_rejected) for r in results.values()} == {
        (results["jsonl"].n_train, results["jsonl"].n_eval, 0)
    }

    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    reordered = validate_dataset(make_cfg(write_jsonl(tmp_path / "shuffled.jsonl", shuffled)), store, tokenizer)
    assert reordered.fingerprint == results["jsonl"].fingerprint
    # the seeded split follows the rows, not their positions
    assert sorted(map(json.dumps, read_split(reordered.eval_uri))) == sorted(
        map(json.dumps, read_split(results["jsonl"].eval_uri))
    )

    changed = json.loads(json.dumps(rows))
    changed[17]["messages"][1]["content"] = changed[17]["messages"][1]["content"].replace("a", "e", 1)
    assert (
        validate_dataset(make_cfg(write_jsonl(tmp_path / "changed.jsonl", changed)), store, tokenizer).fingerprint
        != results["jsonl"].fingerprint
    )
    base = results["jsonl"].fingerprint
    assert (
        validate_dataset(make_cfg(paths_jsonl := tmp_path / "d.jsonl", split_seed=7), store, tokenizer).fingerprint
        != base
    )
    assert (
        validate_dataset(make_cfg(paths_jsonl, **{"training.max_seq_length": 100}), store, tokenizer).fingerprint
        != base
    )


def test_prompt_completion_and_instruction_shapes(tmp_path, make_cfg, store, tokenizer):
    import pandas as pd

    pc = tmp_path / "pc.csv"
    pd.DataFrame({"q": [f"Question {i}?" for i in range(10)], "a": [f"Answer {i}." for i in range(10)]}).to_csv(
        pc, index=False
    )
    result = validate_dataset(
        make_cfg(pc, column_mapping={"q": "prompt", "a": "completion"}, system_prompt="Be terse."), store, tokenizer
    )
    rows = read_split(result.train_uri) + read_split(result.eval_uri)
    assert len(rows) == 10 and result.n_rejected == 0
    assert sorted(rows, key=lambda m: m[1]["content"])[3] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Question 3?"},
        {"role": "assistant", "content": "Answer 3."},
    ]
    assert json.loads(Path(result.report_uri).read_text())["shapes"] == {"train": "prompt_completion"}

    inst = write_jsonl(
        tmp_path / "inst.jsonl",
        [{"instruction": f"Double {i}", "input": "" if i % 2 else f"x = {i}", "output": str(2 * i)} for i in range(10)],
    )
    result = validate_dataset(make_cfg(inst), store, tokenizer)
    rows = {m[1]["content"]: m for m in read_split(result.train_uri) + read_split(result.eval_uri)}
    assert rows["6"] == [{"role": "user", "content": "Double 3"}, {"role": "assistant", "content": "6"}]
    assert rows["8"] == [{"role": "user", "content": "Double 4\n\nx = 4"}, {"role": "assistant", "content": "8"}]


def test_system_prompt_only_added_where_missing(tmp_path, make_cfg, store, tokenizer):
    rows = make_chat_rows(10)
    rows[0]["messages"].insert(0, {"role": "system", "content": "Own system."})
    result = validate_dataset(
        make_cfg(write_jsonl(tmp_path / "s.jsonl", rows), system_prompt="Default.", eval_fraction=0.5), store, tokenizer
    )
    systems = sorted(m[0]["content"] for m in read_split(result.train_uri) + read_split(result.eval_uri))
    assert systems == ["Default."] * 9 + ["Own system."]


# ------------------------------------------------------------------ splits, eval file, over-length


def test_seeded_split_is_deterministic_and_leak_free(tmp_path, make_cfg, store, tokenizer):
    rows = make_chat_rows(400)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = validate_dataset(make_cfg(path, eval_fraction=0.2), store, tokenizer)
    b = validate_dataset(make_cfg(path, eval_fraction=0.2, split_seed=3), store, tokenizer)
    assert 50 <= a.n_eval <= 110 and a.n_train + a.n_eval == 400
    assert read_split(a.eval_uri) != read_split(b.eval_uri)
    prompts = lambda uri: {json.dumps(m[:-1]).lower() for m in read_split(uri)}  # noqa: E731
    assert not prompts(a.train_uri) & prompts(a.eval_uri)


def test_eval_file_is_the_eval_split(tmp_path, make_cfg, store, tokenizer):
    rows = make_chat_rows(30)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:24])
    held = write_jsonl(tmp_path / "eval.jsonl", rows[24:])
    result = validate_dataset(make_cfg(train, eval_path=str(held)), store, tokenizer)
    assert (result.n_train, result.n_eval) == (24, 6)
    assert read_split(result.eval_uri) == [r["messages"] for r in rows[24:]]


@pytest.mark.parametrize("policy", ["fail", "drop", "truncate"])
def test_overlength_policy(policy, tmp_path, make_cfg, store, tokenizer):
    rows = make_chat_rows(12)
    rows[4]["messages"][1]["content"] = "word " * 300
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = make_cfg(path, overlength_policy=policy)
    if policy == "fail":
        with pytest.raises(DataValidationError) as info:
            validate_dataset(cfg, store, tokenizer)
        assert info.value.checks == {"overlength": 1, "rejected_fraction": 1}
        assert f"{path}:5 messages [overlength]" in str(info.value)
        return
    result = validate_dataset(cfg, store, tokenizer)
    kept = read_split(result.train_uri) + read_split(result.eval_uri)
    if policy == "drop":
        assert (result.n_rejected, len(kept)) == (1, 11)
        assert quarantine_of(result.report_uri)[0]["row"] == 5
    else:
        assert (result.n_rejected, len(kept)) == (0, 12)
        cut = next(m for m in kept if m[1]["content"].startswith("word"))
        n_tokens = len(tokenizer.apply_chat_template(cut, tokenize=True)["input_ids"])
        assert 120 <= n_tokens <= 128  # cut to fit, not emptied
        assert json.loads(Path(result.report_uri).read_text())["n_truncated"] == 1


def test_truncate_rejects_rows_whose_prompt_alone_is_too_long(tmp_path, make_cfg, store, tokenizer):
    rows = make_chat_rows(12)
    rows[0]["messages"][0]["content"] = "word " * 300
    with pytest.raises(DataValidationError) as info:
        validate_dataset(
            make_cfg(write_jsonl(tmp_path / "p.jsonl", rows), overlength_policy="truncate"), store, tokenizer
        )
    assert info.value.checks["overlength"] == 1
    assert "cutting the assistant reply cannot make it fit" in str(info.value)


# ------------------------------------------------------------------ errors, S3, Prefect wrapper


def test_missing_file_names_the_path(tmp_path, make_cfg, store, tokenizer):
    cfg = make_cfg(MALFORMED / "too_few_rows.jsonl")
    cfg.data.train_path = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(ConfigError, match="data.train_path: .*nowhere.jsonl.* does not exist"):
        validate_dataset(cfg, store, tokenizer)


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_sources(tmp_path, make_cfg, store, tokenizer, s3_server, monkeypatch):
    import boto3

    for var, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(var, value)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="data")
    paths = write_all_formats(tmp_path, make_chat_rows(20))
    client.upload_file(str(paths["jsonl"]), "data", "sets/d.jsonl")
    for f in paths["hf_disk"].iterdir():
        client.upload_file(str(f), "data", f"sets/hf/{f.name}")
    s3 = {"execution.s3.endpoint_url": s3_server, "execution.s3.region": "us-east-1"}

    local = validate_dataset(make_cfg(paths["jsonl"]), store, tokenizer)
    remote = validate_dataset(make_cfg("s3://data/sets/d.jsonl", **s3), store, tokenizer)
    remote_hf = validate_dataset(make_cfg("s3://data/sets/hf", **s3), store, tokenizer)
    assert (remote.source_format, remote_hf.source_format) == ("jsonl", "hf_disk")
    assert local.fingerprint == remote.fingerprint == remote_hf.fingerprint
    assert remote.n_train + remote.n_eval == 20
    with pytest.raises(ConfigError, match="s3://data/sets/missing.jsonl"):
        validate_dataset(make_cfg("s3://data/sets/missing.jsonl", **s3), store, tokenizer)


def test_prefect_task_publishes_report_and_rejection_event(tmp_path, make_cfg, tokenizer, monkeypatch):
    import prefect.artifacts
    import prefect.events

    models = types.ModuleType("qlora_flow.models")
    models.load_tokenizer_for = lambda base_cfg: tokenizer
    monkeypatch.setitem(sys.modules, "qlora_flow.models", models)
    tables, events = [], []
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", lambda **kw: tables.append(kw))
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: events.append(kw))
    path, _ = write_mixed(tmp_path / "mixed.jsonl")

    result = validate_mod.validate_dataset_task.fn(make_cfg(path, max_rejected_fraction=0.2))
    assert result.n_rejected == 4
    assert {row["check"]: row["rows"] for row in tables[0]["table"]} == {
        "duplicate": 1,
        "empty_content": 1,
        "last_turn": 1,
        "parse": 1,
    }
    assert events[0]["event"] == "data.rejected" and events[0]["payload"]["n_rejected"] == 4

    with pytest.raises(DataValidationError):  # a failing run still reports what it quarantined
        validate_mod.validate_dataset_task.fn(make_cfg(path))
    assert len(tables) == 2 and len(events) == 2
    assert (
        validate_mod.validate_dataset_task.retry_condition_fn(
            None, None, types.SimpleNamespace(result=lambda raise_on_failure: DataValidationError("x", {}))
        )
        is False
    )
    assert (
        validate_mod.validate_dataset_task.retry_condition_fn(
            None, None, types.SimpleNamespace(result=lambda raise_on_failure: OSError("reset"))
        )
        is True
    )


# ------------------------------------------------------------------ token counting shortcut


def test_byte_bound_never_hides_an_overlength_row(tokenizer):
    rng = random.Random(0)
    words = ["a", "data", "ünïcødé", "naïve", '{"k": 1}', "🙂", "longerwordhere", "\n"]
    convs = [
        [
            {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 60)))},
            {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 60)))},
        ]
        for _ in range(300)
    ]
    exact = [len(tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in convs]
    assert validate_mod._tokens_never_shorter_than_a_byte(tokenizer)
    limit = sorted(exact)[150]  # half the rows are over the limit
    counted = validate_mod._Lengths(tokenizer, limit, byte_bound=True).count(convs)
    for got, true in zip(counted, exact):
        assert got >= true  # an upper bound at worst...
        assert (got > limit) == (true > limit)  # ...that never changes the verdict
        if true > limit:
            assert got == true  # and exact wherever a row is reported as too long
    assert validate_mod._Lengths(tokenizer, limit, byte_bound=False).count(convs) == exact


@pytest.mark.parametrize(
    "spec, bounded",
    [
        (
            {
                "normalizer": None,
                "model": {"type": "BPE"},
                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
            },
            True,
        ),
        (
            {
                "normalizer": None,
                "model": {"type": "BPE"},
                "pre_tokenizer": {
                    "type": "Sequence",
                    "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel", "add_prefix_space": False}],
                },
            },
            True,
        ),
        (
            {
                "normalizer": None,
                "model": {"type": "BPE"},
                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True},
            },
            False,
        ),
        ({"normalizer": None, "model": {"type": "BPE"}, "pre_tokenizer": {"type": "Metaspace"}}, False),
        ({"normalizer": {"type": "NFKC"}, "model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel"}}, False),
        ({"normalizer": None, "model": {"type": "Unigram"}, "pre_tokenizer": {"type": "ByteLevel"}}, False),
    ],
)
def test_byte_bound_only_for_byte_level_bpe(spec, bounded):
    fake = types.SimpleNamespace(backend_tokenizer=types.SimpleNamespace(to_str=lambda: json.dumps(spec)))
    assert validate_mod._tokens_never_shorter_than_a_byte(fake) is bounded


def test_tokenizer_without_chat_template_is_a_config_error(tmp_path, make_cfg, store, tokenizer):
    bare = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        validate_dataset(make_cfg(MALFORMED / "too_few_rows.jsonl"), store, bare)


def test_quarantine_names_source_columns_under_column_mapping(tmp_path, make_cfg, store, tokenizer):
    rows = [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(10)] + [{"q": "Question 10?", "a": 10}]
    cfg = make_cfg(
        write_jsonl(tmp_path / "qa.jsonl", rows),
        column_mapping={"q": "prompt", "a": "completion"},
        max_rejected_fraction=0.1,
        eval_fraction=0.5,
    )
    result = validate_dataset(cfg, store, tokenizer)
    assert [(q["row"], q["reasons"]) for q in quarantine_of(result.report_uri)] == [
        (11, [{"check": "type", "field": "a", "message": "field has the wrong type, expected a string (got 10)"}])
    ]


def test_explicit_format_without_its_columns_fails_naming_them(make_cfg, store, tokenizer):
    with pytest.raises(DataValidationError, match=r"expected prompt\+completion") as info:
        validate_dataset(make_cfg(MALFORMED / "too_few_rows.jsonl", format="prompt_completion"), store, tokenizer)
    assert info.value.checks == {"missing_columns": 1}


def test_csv_chat_column_under_column_mapping(tmp_path, make_cfg, store, tokenizer):
    import pandas as pd

    rows = make_chat_rows(10)
    path = tmp_path / "chat.csv"
    pd.DataFrame({"conversation": [json.dumps(r["messages"]) for r in rows[:9]] + ["[not json"]}).to_csv(
        path, index=False
    )
    cfg = make_cfg(path, column_mapping={"conversation": "messages"}, max_rejected_fraction=0.1, eval_fraction=0.5)
    result = validate_dataset(cfg, store, tokenizer)
    assert result.n_train + result.n_eval == 9
    assert sorted(map(json.dumps, read_split(result.train_uri) + read_split(result.eval_uri))) == sorted(
        json.dumps(r["messages"]) for r in rows[:9]
    )
    [q] = quarantine_of(result.report_uri)
    # the 10th record, on line 11 below the header
    assert (q["row"], q["reasons"][0]["check"], q["reasons"][0]["field"]) == (11, "messages_type", "conversation")
