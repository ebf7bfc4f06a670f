"""Task metrics on generated answers: exact match, token F1, and JSON validity / field accuracy.

Pure string functions, so they are tested on hand-made strings and reused by any stage.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def _normalise(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, whitespace tokens."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over normalised whitespace tokens (both empty: 1, one empty: 0)."""
    pred, ref = _normalise(prediction), _normalise(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_json_object(text: str) -> dict | None:
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact match and F1; for references that are JSON objects, the share of predictions that parse
    as a JSON object, the accuracy over all reference fields (`json_field_accuracy`) and per top-level
    field (`json_field_accuracy.<field>`). A field counts as correct when the parsed prediction holds the
    same parsed value (so 30 != "30"); an unparsable prediction gets every field wrong.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    if n == 0:
        return {}
    metrics = {
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
    }
    json_refs = parsed = 0
    field_hits: Counter[str] = Counter()
    field_totals: Counter[str] = Counter()
    for prediction, reference in zip(predictions, references):
        ref = parse_json_object(reference)
        if ref is None:
            continue
        json_refs += 1
        pred = parse_json_object(prediction)
        parsed += pred is not None
        for field, value in ref.items():
            field_totals[field] += 1
            field_hits[field] += pred is not None and field in pred and pred[field] == value
    if json_refs:
        metrics["json_parse_rate"] = parsed / json_refs
    if field_totals:
        metrics["json_field_accuracy"] = sum(field_hits.values()) / sum(field_totals.values())
        for field in sorted(field_totals):
            metrics[f"json_field_accuracy.{field}"] = field_hits[field] / field_totals[field]
    return metrics
