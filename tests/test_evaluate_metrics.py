"""Task metrics on hand-made strings, and the assistant-token mask against the training template's mask."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qlora_flow.metrics import exact_match, generation_metrics, token_f1
from qlora_flow.models import chatml_training_template
from tasks.evaluate import assistant_token_mask, cut_at_stop
from tests.conftest import TOKENIZER_DIR, make_chat_rows


def test_exact_match_strips_but_is_case_sensitive():
    assert exact_match('  {"a": 1}\n', '{"a": 1}') == 1.0
    assert exact_match("Ada", "ada") == 0.0


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat", "a cat sat down", 0.8),  # articles dropped: p = 2/2, r = 2/3
        ("Cat, cat!", "cat", 2 / 3),  # punctuation and case normalised; duplicates count once per match
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("x", "", 0.0),
        ('{"name": "Bob", "age": "41"}', '{"name": "Bob", "age": 41}', 1.0),  # F1 ignores JSON types
    ],
)
def test_token_f1_squad_style(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


def test_json_parse_rate_and_field_accuracy():
    references = ['{"name": "Ada", "age": 30}', '{"name": "Bob", "age": 41}', '{"name": "Cyd", "age": 50}', "plain"]
    predictions = ['{"name": "Ada", "age": 30}', '{"name": "Bob", "age": "41"}', "[1, 2]", "plain"]
    m = generation_metrics(predictions, references)
    assert m["exact_match"] == pytest.approx(0.5)
    assert m["token_f1"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert m["json_parse_rate"] == pytest.approx(2 / 3)  # a JSON array is not an object
    assert m["json_field_accuracy.name"] == pytest.approx(2 / 3)
    assert m["json_field_accuracy.age"] == pytest.approx(1 / 3)  # "41" != 41
    assert m["json_field_accuracy"] == pytest.approx(3 / 6)


def test_no_json_references_means_no_json_metrics():
    m = generation_metrics(["x y", "c"], ["x y z", "c"])
    assert set(m) == {"exact_match", "token_f1"}
    assert m["token_f1"] == pytest.approx((0.8 + 1.0) / 2)


def test_cut_at_stop_keeps_first_end_of_turn_only():
    assert cut_at_stop([5, 6, 2, 2, 2], [2]) == [5, 6, 2]
    assert cut_at_stop([5, 6], [2]) == [5, 6]


def test_assistant_mask_equals_training_mask_and_includes_end_of_turn():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    multi_turn = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "Record 7: Ada is 30 years old."},
        {"role": "assistant", "content": '{"name": "Ada", "age": 30}'},
    ]
    template = chatml_training_template(tok.chat_template)
    for messages in (make_chat_rows(1)[0]["messages"], multi_turn):
        ids, mask = assistant_token_mask(tok, messages)
        rendered = tok.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert ids == rendered["input_ids"]
        assert [int(m) for m in mask] == rendered["assistant_masks"]
        scored = [t for t, m in zip(ids, mask) if m]
        assert scored[-1] == im_end and ids[-1] != im_end  # the turn's <|im_end|> counts, the newline after it not
        n_turns = sum(m["role"] == "assistant" for m in messages)
        assert scored.count(im_end) == n_turns
        assert tok.decode(scored, skip_special_tokens=True) == "".join(
            m["content"] for m in messages if m["role"] == "assistant"
        )
