"""Chat templates for training: which one train uses (train.chat_template), the built-in `chatml-tools`, and the
checks that a template trains (it marks the assistant turn) and keeps every tool call.

`chatml-tools` is for ChatML-family models (`<|im_start|>role\\n...<|im_end|>`) whose own template has no
`{% generation %}` markers and for which trl ships no training version, SmolLM2-Instruct among them. It is trl's
Qwen2.5 training template (same structure, markers, tools block and `<tool_call>` rendering) with two changes:

- the default system prompt is the base model's own, read from its template (SmolLM2 says "You are a helpful AI
  assistant named SmolLM, trained by Hugging Face"), so that it renders the same bytes as the model's own
  template wherever that one is defined: conversations without tools, tool calls or tool results;
- a tool call is written exactly as stages.chat.render_tool_call writes it (`name | tojson`), the format eval
  parses back with stages.chat.parse_tool_calls.

No torch here; transformers only inside the functions that render.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from stages.chat import render_tool_call

BUILTINS = ("chatml-tools",)

_CHATML_TOOLS = r"""{#- chatml-tools (agent-flywheel, stages/templates.py): ChatML with {% generation %} markers and
    Hermes-style tools, after trl's qwen2_5_training.jinja; default system prompt: the base model's own. -#}
{%- set default_system = __DEFAULT_SYSTEM__ %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- elif default_system %}
        {{- default_system }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0]['role'] != 'system' and default_system %}
    {{- '<|im_start|>system\n' + default_system + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = message['content'] if message['content'] is string else '' %}
    {%- if message['role'] == 'system' and loop.first %}
        {%- if not tools %}
            {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
        {{- content }}
        {%- for call in message.get('tool_calls') or [] %}
            {%- set fn = call['function'] if call['function'] is defined else call %}
            {%- if not loop.first or content %}{{- '\n' }}{%- endif %}
            {{- '<tool_call>\n{"name": ' + (fn['name'] | tojson) + ', "arguments": ' + (fn['arguments'] | tojson) + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- elif message['role'] == 'tool' %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


class TemplateError(SystemExit):
    """A chat template that cannot train or would lose data; the message says what to set."""


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def is_chatml(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return "<|im_start|>" in vocab and "<|im_end|>" in vocab and "<|im_start|>" in (tokenizer.chat_template or "")


def default_system_prompt(tokenizer, template: str) -> str:
    """The system prompt `template` inserts when a conversation has none ('' when it inserts none)."""
    probe = [{"role": "user", "content": "\x00probe"}]
    text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", text, re.S)
    return m.group(1) if m else ""


def chatml_tools(default_system: str = "") -> str:
    """The built-in template with this default system prompt."""
    import json

    return _CHATML_TOOLS.replace("__DEFAULT_SYSTEM__", json.dumps(default_system, ensure_ascii=False))


def resolve(tokenizer, spec: str) -> tuple[str, str]:
    """(template text, its name) for train.chat_template = spec on this tokenizer."""
    own = tokenizer.chat_template
    if isinstance(own, dict):  # several named templates: the default one is the chat template
        own = own.get("default")
    if spec.endswith(".jinja") or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise TemplateError(f"train.chat_template: {spec} is not a file (a .jinja file, 'auto', 'model' or "
                                f"one of {', '.join(BUILTINS)})")
        return path.read_text(encoding="utf-8"), f"file:{path.name}"
    if spec == "chatml-tools":
        return chatml_tools(default_system_prompt(tokenizer, own) if own else ""), "chatml-tools"
    if spec not in ("auto", "model"):
        raise TemplateError(f"train.chat_template: unknown value {spec!r}; use auto, model, "
                            f"{', '.join(BUILTINS)} or a path to a .jinja file")
    if not own:
        raise TemplateError("the base's tokenizer has no chat template: set train.chat_template to a .jinja file "
                            "or chatml-tools, or use an instruct/chat model")
    if spec == "model" or has_generation_markers(own):
        return own, "model"
    from trl.chat_template_utils import get_training_chat_template

    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        patched = None
    if patched:
        return patched, "trl-training"
    if is_chatml(tokenizer):
        return chatml_tools(default_system_prompt(tokenizer, own)), "chatml-tools"
    return own, "model"  # no markers: require_trainable() says what to do


def _own_template_defined(row: dict) -> bool:
    """Rows a tool-unaware template renders completely: no tools, no tool calls, no tool results."""
    return not row.get("tools") and all(not m.get("tool_calls") and m["role"] != "tool" for m in row["messages"])


def compare_with_own(tokenizer, template: str, own: str, rows: Sequence[dict]) -> dict[str, int]:
    """Render every row where the model's own template is defined with both templates. Counts compared rows;
    raises on the first that differs (the built-in would change what the model was tuned on)."""
    compared = 0
    for row in rows:
        if not _own_template_defined(row):
            continue
        for gen in (False, True):
            msgs = row["messages"][:-1] if gen else row["messages"]
            a = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)
            b = tokenizer.apply_chat_template(msgs, chat_template=own, tokenize=False, add_generation_prompt=gen)
            if a != b:
                raise TemplateError(f"row {row.get('id')}: the training template renders it differently from the "
                                    "base model's own template; set train.chat_template: model or a .jinja file")
        compared += 1
    return {"template_rows_compared": compared}


def dropped_tool_calls(tokenizer, template: str, row: dict) -> int:
    """How many of the row's tool calls the template does not render in stages.chat's <tool_call> format."""
    calls = [c for m in row["messages"] if m["role"] == "assistant" for c in (m.get("tool_calls") or [])]
    if not calls:
        return 0
    text = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), chat_template=template,
                                         tokenize=False)
    missing, pos = 0, 0
    for call in calls:  # in order: two identical calls need two renderings
        fn = call.get("function") or {}
        want = render_tool_call(str(fn.get("name", "")), fn.get("arguments", {}))
        at = text.find(want, pos)
        if at < 0:
            missing += 1
        else:
            pos = at + len(want)
    return missing


def filter_tool_calls(tokenizer, template: str, rows: Sequence[dict], policy: str, split: str) -> tuple[list[dict], int]:
    """Rows whose every tool call the template renders; the others raise or are dropped (counted) by policy."""
    kept, dropped = [], 0
    for row in rows:
        n = dropped_tool_calls(tokenizer, template, row)
        if not n:
            kept.append(row)
            continue
        if policy == "raise":
            raise TemplateError(
                f"{split} row {row['id']}: the chat template drops {n} tool call(s) (not rendered as <tool_call> "
                "JSON): training would teach the model to answer with nothing. Use train.chat_template: chatml-tools "
                "(ChatML models) or a .jinja file that renders tool calls, or train.unrendered_tool_calls: drop")
        dropped += 1
    return kept, dropped


def template_info(template: str, name: str) -> dict[str, Any]:
    from stages.core import content_id

    return {"name": name, "digest": content_id(template), "generation_markers": has_generation_markers(template)}
