"""The one rendering of a conversation into prompt text, by the model's chat template: the
worker's API, the offline API and the router (for its prefix hashes) all call it, so they all
see the prompt the engine computes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                tools: Sequence[Mapping[str, Any]] | None = None, chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text for `messages`, ending where the assistant's answer starts (or, with
    `continue_final_message`, inside the last assistant message). `tools` (OpenAI's function
    definitions), `chat_template` (instead of the tokenizer's) and `template_kwargs` (variables
    such as enable_thinking) reach the template as transformers' apply_chat_template passes them.
    A ValueError naming `messages` when the model has no chat template or the template refuses them."""
    if chat_template is None and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise ValueError("messages: this model has no chat template; send a plain prompt instead")
    if not messages:
        raise ValueError("messages: must not be empty")
    try:
        return tokenizer.apply_chat_template(
            list(messages), tools=list(tools) if tools else None, chat_template=chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tokenize=False, **dict(template_kwargs or {}))
    except Exception as exc:  # a template raises whatever it likes on role orders it does not accept
        raise ValueError(f"messages: the chat template refused them ({exc})") from exc
