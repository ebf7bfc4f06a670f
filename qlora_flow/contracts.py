"""The training-data contract, as pandera schemas over one chunk of rows.

Rows arrive in one of four shapes (chat `messages`, ShareGPT `conversations`, prompt/completion,
instruction/input/output). Each shape has an input schema; rows that pass are normalised to turns
and exploded into a one-row-per-turn frame checked by TURNS (which also knows OpenAI-style tool
calls and tool results), then folded into plain `messages`; rendered token lengths are checked by
`length_schema`.
Every check has a short name (the key of CHECKS) that ends up in quarantine reasons, the report
and DataValidationError, so a failure always says which rule it broke.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import pandas as pd
import pandera.pandas as pa

from qlora_flow.errors import PermanentError

ROLES = ("system", "user", "assistant")
# A tool result is a turn of its own until the contract has checked it follows a call; stored
# conversations then carry it inside a user turn (see tasks/validate.py: fold_tool_turns).
TURN_ROLES = ROLES + ("tool",)
# ShareGPT `from` -> role. function_call is the assistant calling a tool, observation its result.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}

# Check name -> what it means, phrased for the person fixing the data.
CHECKS: dict[str, str] = {
    "parse": "row is not valid JSON/CSV",
    "row_type": "row is not an object with named fields",
    "missing_field": "required field is missing or null",
    "type": "field has the wrong type, expected a string",
    "messages_type": "`messages` must be a non-empty list of {role, content} objects",
    "conversations_type": "`conversations` must be a non-empty list of {from, value} objects (ShareGPT)",
    "empty_content": "content is empty after stripping whitespace",
    "encoding": "text is not valid UTF-8 (undecodable bytes or U+FFFD left by an earlier lossy decode)",
    "control_chars": "text contains control characters (only \\n and \\t are allowed)",
    "role": f"role must be one of {', '.join(TURN_ROLES)} (ShareGPT `from`: {', '.join(SHAREGPT_ROLES)})",
    "system_position": "a system turn may only be the first turn",
    "role_order": "turns after the optional system turn must alternate user, assistant, user, ...",
    "last_turn": "the last turn must come from the assistant",
    "tool_call": "a tool call must be an object with a non-empty string `name` and JSON-object `arguments` "
    "(OpenAI tool_calls[].function, or a ShareGPT function_call value)",
    "tool_position": "a tool result must follow an assistant turn with tool calls (or another tool result)",
    "tool_call_id": "tool_call_id names no call of the preceding assistant turn",
    "special_tokens": "text holds a special token of the chat template (such as <|im_end|>): it would fake a turn "
    "boundary in the rendered chat",
    "overlength": "rendered chat is longer than training.max_seq_length tokens",
    "duplicate": "exact duplicate of an earlier row",
    "near_duplicate": "duplicate of an earlier row after whitespace/case normalisation",
    "leakage": "prompt also appears in the eval split",
    # file-level checks: the whole source is unusable, nothing to quarantine row by row
    "unknown_format": "file format not recognised",
    "empty_file": "source holds no rows",
    "missing_columns": "source has none of the column sets of a known data shape",
    "min_rows": "too few accepted rows in a split",
    "rejected_fraction": "more rows rejected than data.max_rejected_fraction allows",
}

# pandera's own check for nullable=False columns, mapped onto our vocabulary
PANDERA_NAMES = {"not_nullable": "missing_field"}

_BAD_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Readers decode with surrogateescape, so undecodable bytes arrive as lone surrogates. pandera
# cannot report a value holding one (its failure table is arrow-backed), so frames get U+FFFD in
# their place; U+FFFD is also what an earlier lossy decode leaves behind, and equally unusable.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def mark_invalid_utf8(value: object) -> object:
    """value with undecodable bytes replaced by U+FFFD, for building frames; non-strings unchanged."""
    return _SURROGATE.sub(REPLACEMENT, value) if isinstance(value, str) and not value.isascii() else value


class DataValidationError(PermanentError, ValueError):
    """The data broke the contract; the message lists counts per check and the first offending rows."""

    def __init__(self, message: str, checks: dict[str, int], report: dict | None = None):
        super().__init__(message)
        self.checks = checks
        self.report = report


def _is_str(x: object) -> bool:
    return isinstance(x, str)


def _non_empty(x: object) -> bool:
    return not isinstance(x, str) or x.strip() != ""


def _valid_utf8(x: object) -> bool:
    return not isinstance(x, str) or REPLACEMENT not in x


def _no_control_chars(x: object) -> bool:
    return not isinstance(x, str) or _BAD_CONTROL.search(x) is None


def _is_turn_list(x: object) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, dict) for t in x)


def _text_checks(required: bool = True) -> list[pa.Check]:
    checks = [
        pa.Check(_non_empty, element_wise=True, name="empty_content"),
        pa.Check(_valid_utf8, element_wise=True, name="encoding"),
        pa.Check(_no_control_chars, element_wise=True, name="control_chars"),
    ]
    return [pa.Check(_is_str, element_wise=True, name="type")] + checks if required else checks


def _text(required: bool = True) -> pa.Column:
    # dtype=None: pandas infers `str` or `object` per chunk; types are checked per element so a
    # single bad value is reported against its row instead of failing the column's dtype.
    return pa.Column(None, nullable=not required, required=required, checks=_text_checks())


INPUT_SCHEMAS: dict[str, pa.DataFrameSchema] = {
    "messages": pa.DataFrameSchema(
        {
            "messages": pa.Column(
                None, nullable=False, checks=pa.Check(_is_turn_list, element_wise=True, name="messages_type")
            )
        }
    ),
    "prompt_completion": pa.DataFrameSchema({"prompt": _text(), "completion": _text()}),
    # `input` is optional context; when present it must still be clean text (empty is fine)
    "instruction": pa.DataFrameSchema(
        {
            "instruction": _text(),
            "input": pa.Column(
                None,
                nullable=True,
                required=False,
                checks=[pa.Check(_is_str, element_wise=True, name="type")] + _text_checks(required=False)[1:],
            ),
            "output": _text(),
        }
    ),
}

INPUT_SCHEMAS["sharegpt"] = pa.DataFrameSchema(
    {
        "conversations": pa.Column(
            None, nullable=False, checks=pa.Check(_is_turn_list, element_wise=True, name="conversations_type")
        )
    }
)

# Columns that identify each shape, in the order `format: auto` tries them.
SHAPE_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "output"),
}


def _system_first(turns: pd.DataFrame) -> pd.Series:
    return (turns["role"] != "system") | (turns["turn"] == 0)


def _previous(turns: pd.DataFrame, column: str) -> pd.Series:
    return turns.groupby("row")[column].shift(1)


def _alternating(turns: pd.DataFrame) -> pd.Series:
    # position among the row's non-system turns decides the expected role; a run of tool results
    # takes one user slot. Unknown roles, misplaced system turns and tool results without a call
    # are reported by their own checks, not twice.
    role = turns["role"]
    counted = (role != "system") & ~((role == "tool") & (_previous(turns, "role") == "tool"))
    position = counted.astype(int).groupby(turns["row"]).cumsum() - 1
    expected = position.mod(2).map({0: "user", 1: "assistant"})
    return ~role.isin(("user", "assistant", "tool")) | (role == expected) | ((role == "tool") & (expected == "user"))


def _tool_after_call(turns: pd.DataFrame) -> pd.Series:
    before = _previous(turns, "role")
    return (
        (turns["role"] != "tool")
        | (before == "tool")
        | ((before == "assistant") & _previous(turns, "has_calls").eq(True))
    )


def _known_call_id(turns: pd.DataFrame) -> pd.Series:
    ids = zip(turns["tool_call_id"], turns["open_call_ids"])
    return (turns["role"] != "tool") | pd.Series([i is None or i in open_ids for i, open_ids in ids], index=turns.index)


def _valid_calls(calls: object) -> bool:
    """None (no calls) or a list of {name: non-empty str, arguments: dict}."""
    return calls is None or (
        isinstance(calls, list)
        and all(
            isinstance(c.get("name"), str) and c["name"].strip() and isinstance(c.get("arguments"), dict) for c in calls
        )
    )


def _assistant_last(turns: pd.DataFrame) -> pd.Series:
    return (turns["turn"] != turns["n_turns"] - 1) | (turns["role"] == "assistant")


TURNS = pa.DataFrameSchema(
    {
        "row": pa.Column(int),
        "turn": pa.Column(int, pa.Check.ge(0)),
        "n_turns": pa.Column(int, pa.Check.ge(1)),
        "role": pa.Column(
            None,
            nullable=False,
            checks=[
                pa.Check(_is_str, element_wise=True, name="type"),
                pa.Check(lambda x: not isinstance(x, str) or x in TURN_ROLES, element_wise=True, name="role"),
            ],
        ),
        "content": _text(),
        # the turn's tool calls normalised to {id, name, arguments} (None: no calls)
        "tool_calls": pa.Column(
            None, nullable=True, checks=pa.Check(_valid_calls, element_wise=True, name="tool_call")
        ),
        "tool_call_id": pa.Column(None, nullable=True),
        "has_calls": pa.Column(bool),
        "open_call_ids": pa.Column(None),  # ids of the calls of the assistant turn before this one
    },
    checks=[
        pa.Check(_system_first, name="system_position"),
        pa.Check(_alternating, name="role_order"),
        pa.Check(_assistant_last, name="last_turn"),
        pa.Check(_tool_after_call, name="tool_position"),
        pa.Check(_known_call_id, name="tool_call_id"),
    ],
)


def length_schema(max_seq_length: int) -> pa.DataFrameSchema:
    return pa.DataFrameSchema({"n_tokens": pa.Column(int, pa.Check.le(max_seq_length, name="overlength"))})


class Failure(NamedTuple):
    index: int  # label of the failing row in the validated frame
    column: str | None  # None for frame-wide checks
    check: str
    value: object


def failures(schema: pa.DataFrameSchema, frame: pd.DataFrame) -> list[Failure]:
    """All failures of one lazy validation pass over frame.

    pandera reports a frame-wide check once per column; those collapse to one failure per row.
    """
    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        found: dict[tuple, Failure] = {}
        for case in exc.failure_cases.itertuples():
            if pd.isna(case.index):  # schema-level problems (dtype, missing column) name no row
                continue
            column = None if case.schema_context == "DataFrameSchema" else case.column
            check = PANDERA_NAMES.get(case.check, case.check)
            found.setdefault((case.index, check, column), Failure(int(case.index), column, check, case.failure_case))
        return list(found.values())
    return []
