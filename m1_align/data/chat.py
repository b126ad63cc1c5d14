"""The Baichuan-M1 chat format and helpers that respect a user model's own template.

    <B_SYS>{system}<C_Q>{user}<C_A>{assistant}</s><C_Q>{user}<C_A>{assistant}</s>...

Assistant turns are wrapped in transformers' {% generation %} markers, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the assistant tokens
(content and the closing </s>) for loss masking.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, EOS_TOKEN = "<B_SYS>", "<C_Q>", "<C_A>", "</s>"
DEFAULT_SYSTEM = "You are a helpful assistant."

BAICHUAN_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + DEFAULT_SYSTEM + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "<B_SYS>{{ system }}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "<C_Q>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "<C_A>{% generation %}{{ message['content'] }}</s>{% endgeneration %}"
    "{%- else -%}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<C_A>{%- endif -%}"
)


def render_baichuan(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The same text as the Jinja template, without a tokenizer (for tests and plain-text use)."""
    turns = list(messages)
    system = DEFAULT_SYSTEM
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    parts = [SYSTEM_TOKEN + system]
    for message in turns:
        if message["role"] == "user":
            parts.append(USER_TOKEN + message["content"])
        elif message["role"] == "assistant":
            parts.append(ASSISTANT_TOKEN + message["content"] + EOS_TOKEN)
        else:
            raise ValueError(f"unsupported role: {message['role']}")
    if add_generation_prompt:
        parts.append(ASSISTANT_TOKEN)
    return "".join(parts)


def chat_template_for(tokenizer: Any) -> str:
    """The tokenizer's own template when it has one (a user's HF model), else Baichuan-M1's."""
    return getattr(tokenizer, "chat_template", None) or BAICHUAN_CHAT_TEMPLATE


def apply_chat_template(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = False,
    tokenize: bool = False,
    **kwargs: Any,
) -> Any:
    """tokenizer.apply_chat_template with our template as the fallback.

    tokenize=False returns the text; tokenize=True returns transformers' BatchEncoding
    (input_ids, attention_mask, and assistant_masks when return_assistant_tokens_mask=True).
    """
    return tokenizer.apply_chat_template(
        list(messages),
        chat_template=chat_template_for(tokenizer),
        add_generation_prompt=add_generation_prompt,
        tokenize=tokenize,
        **kwargs,
    )


def has_generation_markers(template: str) -> bool:
    return re.search(r"{%-?\s*generation\s*-?%}", template) is not None


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> dict[str, list[int]]:
    """input_ids and assistant_mask (1 on assistant tokens) for one conversation.

    Templates without {% generation %} markers (many user models) get the mask from prefix
    rendering instead: the tokens added by each assistant turn.
    """
    template = chat_template_for(tokenizer)
    if has_generation_markers(template):
        out = apply_chat_template(
            tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return {"input_ids": list(out["input_ids"]), "assistant_mask": list(out["assistant_masks"])}
    return _encode_by_prefixes(tokenizer, list(messages))


def _encode_by_prefixes(tokenizer: Any, messages: list[Mapping[str, str]]) -> dict[str, list[int]]:
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = apply_chat_template(tokenizer, messages[:i], add_generation_prompt=True)
        full = apply_chat_template(tokenizer, messages[: i + 1])
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids or full_ids[: len(ids)] != ids:
            raise ValueError(
                "the tokenizer's chat template is not prefix-preserving (rendering a conversation up to an assistant "
                "turn does not tokenise to a prefix of the whole), so the assistant tokens cannot be found; add "
                "{% generation %} markers to its chat_template or set sft.assistant_only_loss=false"
            )
        mask += [0] * (len(prompt_ids) - len(ids)) + [1] * (len(full_ids) - len(prompt_ids))
        ids = full_ids
    full_ids = tokenizer(apply_chat_template(tokenizer, messages), add_special_tokens=False)["input_ids"]
    mask += [0] * (len(full_ids) - len(mask))
    return {"input_ids": full_ids, "assistant_mask": mask[: len(full_ids)]}


def prompt_ids(tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """The chat prompt with the generation prompt (the tokenizer's template, else Baichuan-M1's)."""
    text = apply_chat_template(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
