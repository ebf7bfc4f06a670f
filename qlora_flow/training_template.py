"""The chat template the training stage computes its assistant-only loss mask with, and the merge stage's
check against it. TRL-specific (`{% generation %}` markers); kept out of the stages so both use one copy.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from qlora_flow.models import chatml_training_template, end_of_turn_token_ids

Conversation = list[dict[str, str]]


def training_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A chat template with `{% generation %}` markers, or None when assistant-only masking is impossible."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return tokenizer.chat_template
    try:
        return get_training_chat_template(tokenizer) or tokenizer.chat_template
    except ValueError:
        return chatml_training_template(tokenizer.chat_template)


def end_of_turn_in_training_mask(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> bool | None:
    """Is the end-of-turn token of the last assistant turn inside the assistant mask training used?

    Renders with the very template the training stage picks; None when it found none with assistant
    markers (then training used the whole sequence and there is no mask to get wrong).
    """
    from trl.chat_template_utils import has_generation_markers

    template = training_template(tokenizer)
    if template is None or not has_generation_markers(template):
        return None
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    stops = set(end_of_turn_token_ids(tokenizer))
    masked_stops = [i for i, t in enumerate(ids) if t in stops and mask[i]]
    last_assistant = max(i for i, m in enumerate(mask) if m) if any(mask) else -1
    return bool(masked_stops) and masked_stops[-1] == last_assistant
