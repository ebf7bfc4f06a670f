"""ShareGPT and OpenAI tool-call input: normalised to the same `messages`, checked by the same contract."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TOKENIZER_DIR, make_chat_rows
from transformers import AutoTokenizer

from qlora_flow.config import load_config
from qlora_flow.store import LocalStore
from tasks.validate import validate_dataset

ARGS = {"city": "Oslo", "unit": "celsius"}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def cfg_for(tmp_path, path: Path, **data):
    values = {
        "data.train_path": str(path),
        "data.min_train_rows": 1,
        "training.max_seq_length": 256,
        "execution.store": str(tmp_path / "store"),
    }
    values.update({f"data.{k}": v for k, v in data.items()})
    return load_config(None, values)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tool_rows_openai(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You can call get_weather."},
                    {"role": "user", "content": f"Weather in Oslo, question {i}?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": f"call_{i}",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": json.dumps(ARGS)},
                            },
                            {
                                "id": f"call_{i}b",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": json.dumps(ARGS)},
                            },
                        ],
                    },
                    {"role": "tool", "tool_call_id": f"call_{i}", "content": f"{i} degrees"},
                    {"role": "tool", "content": "cloudy"},  # no id: allowed, it follows the call
                    {"role": "assistant", "content": f"It is {i} degrees and cloudy."},
                ]
            }
        )
    return rows


def tool_rows_sharegpt(n: int) -> list[dict]:
    call = {"name": "get_weather", "arguments": ARGS}
    return [
        {
            "conversations": [
                {"from": "system", "value": "You can call get_weather."},
                {"from": "human", "value": f"Weather in Oslo, question {i}?"},
                {"from": "function_call", "value": json.dumps([call, call])},
                {"from": "observation", "value": f"{i} degrees"},
                {"from": "tool", "value": "cloudy"},
                {"from": "gpt", "value": f"It is {i} degrees and cloudy."},
            ]
        }
        for i in range(n)
    ]


def tool_rows_folded(n: int) -> list[dict]:
    """What training sees: the documented serialisation, written by hand as plain messages."""
    return [
        {
            "messages": [
                {"role": "system", "content": "You can call get_weather."},
                {"role": "user", "content": f"Weather in Oslo, question {i}?"},
                {"role": "assistant", "content": CALL_TEXT + "\n" + CALL_TEXT},
                {
                    "role": "user",
                    "content": f"<tool_response>\n{i} degrees\n</tool_response>\n<tool_response>\ncloudy\n</tool_response>",
                },
                {"role": "assistant", "content": f"It is {i} degrees and cloudy."},
            ]
        }
        for i in range(n)
    ]


def as_sharegpt(row: dict) -> dict:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[t["role"]], "value": t["content"]} for t in row["messages"]]}


def test_sharegpt_openai_tools_and_messages_give_one_fingerprint(tmp_path, store, tokenizer):
    plain = make_chat_rows(20)
    files = {
        "messages": write_jsonl(tmp_path / "messages.jsonl", plain + tool_rows_folded(6)),
        "openai_tools": write_jsonl(tmp_path / "openai.jsonl", plain + tool_rows_openai(6)),
        "sharegpt": write_jsonl(tmp_path / "sharegpt.jsonl", [as_sharegpt(r) for r in plain] + tool_rows_sharegpt(6)),
    }
    results = {name: validate_dataset(cfg_for(tmp_path, path), store, tokenizer) for name, path in files.items()}
    assert {r.n_rejected for r in results.values()} == {0}
    assert {r.n_train + r.n_eval for r in results.values()} == {26}
    assert len({r.fingerprint for r in results.values()}) == 1
    stored = pq.read_table(results["sharegpt"].train_uri).column("messages").to_pylist()
    stored += pq.read_table(results["sharegpt"].eval_uri).column("messages").to_pylist()
    assert sorted(map(json.dumps, stored)) == sorted(json.dumps(r["messages"]) for r in plain + tool_rows_folded(6))
    # a one-word change in a tool call is a different dataset
    changed = tool_rows_openai(6)
    changed[0]["messages"][2]["tool_calls"][0]["function"]["arguments"] = json.dumps({**ARGS, "city": "Bergen"})
    other = validate_dataset(
        cfg_for(tmp_path, write_jsonl(tmp_path / "changed.jsonl", plain + changed)), store, tokenizer
    )
    assert other.fingerprint != results["messages"].fingerprint


def test_sharegpt_format_is_detected_and_can_be_forced(tmp_path, store, tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [as_sharegpt(r) for r in make_chat_rows(10)])
    assert validate_dataset(cfg_for(tmp_path, path, format="sharegpt"), store, tokenizer).n_rejected == 0
    with pytest.raises(Exception, match="missing_columns"):
        validate_dataset(cfg_for(tmp_path, path, format="messages"), store, tokenizer)


def quarantined(tmp_path, store, tokenizer, rows: list[dict]) -> dict[int, dict[str, str]]:
    """row number -> {check: field of the first failing turn} of every quarantined row."""
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    ref = validate_dataset(cfg_for(tmp_path, path, max_rejected_fraction=0.9, eval_fraction=0.4), store, tokenizer)
    lines = Path(ref.quarantine_uri).read_text().splitlines()
    found: dict[int, dict[str, str]] = {}
    for q in map(json.loads, lines):
        for reason in q["reasons"]:
            found.setdefault(q["row"], {}).setdefault(reason["check"], reason["field"])  # first turn that failed it
    return found


def test_malformed_sharegpt_rows_are_quarantined_with_their_check(tmp_path, store, tokenizer):
    good = [as_sharegpt(r) for r in make_chat_rows(20)]
    unknown_from = {"conversations": [{"from": "bot", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    gpt_first = {
        "conversations": [
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Yes"},
        ]
    }
    result_without_call = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "gpt", "value": "Let me look."},
            {"from": "observation", "value": "5 degrees"},
            {"from": "gpt", "value": "5 degrees."},
        ]
    }
    bad_call = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": "get_weather(Oslo)"},
            {"from": "observation", "value": "5 degrees"},
            {"from": "gpt", "value": "5 degrees."},
        ]
    }
    not_a_list = {"conversations": "human: hi"}
    found = quarantined(
        tmp_path, store, tokenizer, good + [unknown_from, gpt_first, result_without_call, bad_call, not_a_list]
    )
    assert found == {
        21: {"role": "conversations[0].from"},
        22: {"role_order": "conversations[0].from"},
        23: {"tool_position": "conversations[2].from"},
        24: {"tool_call": "conversations[1].value"},
        25: {"conversations_type": "conversations"},
    }


def test_malformed_openai_tool_rows_are_quarantined_with_their_check(tmp_path, store, tokenizer):
    good = tool_rows_openai(12)
    result_without_call = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "tool", "content": "5 degrees"},
            {"role": "assistant", "content": "5 degrees."},
        ]
    }
    wrong_id = json.loads(json.dumps(good[0]))
    wrong_id["messages"][3]["tool_call_id"] = "call_99"
    bad_arguments = json.loads(json.dumps(good[1]))
    bad_arguments["messages"][2]["tool_calls"][1]["function"]["arguments"] = "{city: Oslo"
    no_name = json.loads(json.dumps(good[2]))
    del no_name["messages"][2]["tool_calls"][0]["function"]["name"]
    found = quarantined(tmp_path, store, tokenizer, good + [result_without_call, wrong_id, bad_arguments, no_name])
    assert found == {
        13: {"tool_position": "messages[1].role", "role_order": "messages[1].role"},
        14: {"tool_call_id": "messages[3].tool_call_id"},
        15: {"tool_call": "messages[2].tool_calls"},
        16: {"tool_call": "messages[2].tool_calls"},
    }


def test_chat_template_renders_the_documented_tool_text(tokenizer):
    """What training sees for a tool row: the SmolLM2 template renders the folded text verbatim."""
    from tasks.validate import _check_turns, _Chunk, _to_messages

    chunk = _Chunk([None], [_to_messages("messages", tool_rows_openai(1)[0])])
    _check_turns(chunk, "messages")
    rendered = tokenizer.apply_chat_template(chunk.messages[0], tokenize=False)
    assert f"<|im_start|>assistant\n{CALL_TEXT}\n{CALL_TEXT}<|im_end|>" in rendered
    assert (
        "<|im_start|>user\n<tool_response>\n0 degrees\n</tool_response>\n<tool_response>\ncloudy\n</tool_response><|im_end|>"
        in rendered
    )
