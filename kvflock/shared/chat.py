"""The one rendering of a conversation into prompt text, by the model's chat template: the
worker's API, the offline API and the router (for its prefix hashes) all call it, so they all
see the prompt the engine computes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt text for `messages`, ending where the assistant's answer starts. A ValueError
    naming `messages` when the model has no chat template or the template refuses them."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages: this model has no chat template; send a plain prompt instead")
    if not messages:
        raise ValueError("messages: must not be empty")
    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template raises whatever it likes on role orders it does not accept
        raise ValueError(f"messages: the chat template refused them ({exc})") from exc
