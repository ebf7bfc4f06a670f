"""Regenerates the malformed-input corpus next to this file: `python tests/data/malformed/make_corpus.py`.

Each file breaks one rule of the data contract; tests/test_validate.py names the check every
file must trip and the exact rows it must quarantine. The files are committed, so the script is
only needed to change them.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


GOOD = chat("What is the capital of France?", "Paris.")
GOOD2 = chat("Name a prime number.", "Seven.")


def jsonl(name: str, *rows: object) -> None:
    """Rows are dicts (dumped as JSON) or raw str/bytes lines written as they are."""
    out = b""
    for row in rows:
        if isinstance(row, bytes):
            out += row + b"\n"
        elif isinstance(row, str):
            out += row.encode() + b"\n"
        else:
            out += json.dumps(row).encode() + b"\n"
    (HERE / name).write_bytes(out)


def main() -> None:
    jsonl("broken_json.jsonl", GOOD, '{"messages": [{"role": "user", "content": "unterminated', GOOD2)
    jsonl("not_object.jsonl", GOOD, "[1, 2, 3]")
    jsonl(
        "latin1_bytes.jsonl",
        GOOD,
        b'{"messages": [{"role": "user", "content": "caf\xe9 au lait?"}, {"role": "assistant", "content": "Yes."}]}',
    )
    jsonl("control_char.jsonl", GOOD, chat("Ring the bell\u0007 now", "Done."))
    jsonl("nul_byte.jsonl", GOOD, chat("Hello", "Bye\u0000"))
    jsonl("carriage_return.jsonl", GOOD, chat("line one\r\nline two", "ok"))
    jsonl("whitespace_reply.jsonl", GOOD, chat("Say something.", "   \n\t "))
    jsonl("empty_user.jsonl", GOOD, chat("", "An answer to nothing."))
    jsonl(
        "content_not_string.jsonl",
        GOOD,
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": 4}]},
    )
    jsonl(
        "role_not_string.jsonl",
        GOOD,
        {"messages": [{"role": 1, "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    )
    jsonl(
        "unknown_role.jsonl",
        GOOD,
        {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    )
    jsonl(
        "missing_content_key.jsonl", GOOD, {"messages": [{"role": "user"}, {"role": "assistant", "content": "hello"}]}
    )
    jsonl("missing_messages_field.jsonl", GOOD, {"conversation": GOOD2["messages"]})
    jsonl("messages_not_list.jsonl", GOOD, {"messages": "user: hi / assistant: hello"})
    jsonl("messages_empty_list.jsonl", GOOD, {"messages": []})
    jsonl("turn_not_object.jsonl", GOOD, {"messages": ["hi", "hello"]})
    jsonl(
        "last_turn_user.jsonl",
        GOOD,
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "and?"},
            ]
        },
    )
    jsonl(
        "system_in_middle.jsonl",
        GOOD,
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "be brief"},
                {"role": "assistant", "content": "hello"},
            ]
        },
    )
    jsonl(
        "user_twice.jsonl",
        GOOD,
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "user", "content": "hello?"},
                {"role": "assistant", "content": "yes"},
            ]
        },
    )
    jsonl(
        "assistant_first.jsonl",
        GOOD,
        {
            "messages": [
                {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "yes"},
            ]
        },
    )
    jsonl("overlength.jsonl", GOOD, chat("Tell me a long story.", "once upon a time " * 200))
    jsonl("exact_duplicate.jsonl", GOOD, GOOD2, GOOD)
    jsonl("near_duplicate.jsonl", GOOD, GOOD2, chat("what is the  CAPITAL of france?", "  paris. "))
    jsonl("leakage_train.jsonl", GOOD, GOOD2, chat("Name a  PRIME number.", "Eleven."))
    jsonl("leakage_eval.jsonl", chat("name a prime number.", "Three."))
    jsonl("null_completion.jsonl", {"prompt": "hi", "completion": "hello"}, {"prompt": "hi again", "completion": None})
    (HERE / "empty.jsonl").write_bytes(b"")
    (HERE / "blank_lines.jsonl").write_bytes(b"\n\n  \n")
    (HERE / "header_only.csv").write_text("prompt,completion\n")
    (HERE / "unknown_columns.csv").write_text("question,answer\nWhat is 2+2?,4\n")
    (HERE / "notes.txt").write_text("prompt: hi\ncompletion: hello\n")
    (HERE / "short_row.csv").write_text("prompt,completion\nhi,hello\nonly a prompt\n")
    (HERE / "extra_cells.csv").write_text("prompt,completion\nhi,hello\nhi,hello,surprise\n")
    (HERE / "latin1_prompt.csv").write_bytes(b"prompt,completion\nhi,hello\ncr\xe8me br\xfbl\xe9e?,yes\n")
    (HERE / "output_not_string.json").write_text(
        json.dumps(
            [
                {"instruction": "Add", "input": "2 and 2", "output": "4"},
                {"instruction": "Add", "input": "3 and 3", "output": 6},
            ]
        )
    )
    (HERE / "top_level_string.json").write_text(json.dumps("not rows"))
    (HERE / "broken.json").write_text('[{"prompt": "hi", "completion": "hello"},')
    (HERE / "not_parquet.parquet").write_text("this is not parquet\n")
    jsonl("too_few_rows.jsonl", GOOD, GOOD2)


if __name__ == "__main__":
    main()
