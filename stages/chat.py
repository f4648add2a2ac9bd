"""Chat helpers shared by export, build_dataset, train, eval and the templates: tool schemas, how a tool call is written as text, and how
calls are read back from generated text.

One tool-call text format everywhere, Hermes/Qwen style (the format NousResearch Hermes, Qwen 2.5/3 and most
ChatML-family templates render):

    <tool_call>
    {"name": "lookup", "arguments": {"q": 1}}
    </tool_call>

The JSON is written the way transformers' chat-template `tojson` filter writes it (json.dumps, ensure_ascii=False,
default separators), so a template that renders `{"name": ..., "arguments": args | tojson}` and
`render_tool_call()` give the same bytes. Arguments that arrive as a JSON string (OpenAI's shape) are parsed first,
so the rendered call is one JSON object; arguments that are not valid JSON stay a string and are written as one.

No torch or transformers here: data stages may import this module.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)


def parse_tools(tools: Any) -> list | None:
    """Tool schemas for templates that render them (a JSON string or a list); None when there are none."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            return None
    return tools if isinstance(tools, list) and tools else None


def call_arguments(arguments: Any) -> Any:
    """A call's arguments as a value: a JSON string is parsed; anything else (a dict, or a string that is not
    JSON) is returned as it is."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def normalize_tool_calls(calls: Any) -> list[dict]:
    """OpenAI-shaped tool calls with parsed arguments, as a chat template receives them."""
    out = []
    for call in calls or []:
        fn = dict(call.get("function") or {})
        fn["arguments"] = call_arguments(fn.get("arguments", {}))
        out.append({**call, "function": fn})
    return out


def render_tool_call(name: str, arguments: Any) -> str:
    """One call as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`."""
    body = json.dumps({"name": name, "arguments": call_arguments(arguments)}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def reference_text(message: dict) -> str:
    """The text a model should generate for this assistant message: its content, then each tool call on its own
    line in the format above."""
    parts = [message["content"].strip()] if isinstance(message.get("content"), str) and message["content"].strip() else []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        parts.append(render_tool_call(str(fn.get("name", "")), fn.get("arguments", {})))
    return "\n".join(parts)


def parse_tool_calls(text: str) -> tuple[list[dict], int]:
    """Tool calls in generated text: ([{"name", "arguments"}, ...] for the blocks that parse, number of blocks that
    don't). A block parses when its body is a JSON object with a string `name`; `arguments` may be an object or a
    JSON string (parsed). An unterminated last block (generation cut off) counts as one that doesn't parse unless
    its JSON is complete."""
    calls: list[dict] = []
    bad = 0
    for m in _CALL_BLOCK.finditer(text or ""):
        try:
            obj = json.loads(m.group(1).strip())
        except ValueError:
            bad += 1
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            bad += 1
            continue
        calls.append({"name": obj["name"], "arguments": call_arguments(obj.get("arguments", {}))})
    return calls, bad


def canonical_json(value: Any) -> str:
    """Order-free JSON for comparing arguments: sorted keys, no spaces, unicode kept."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------- a trace as agentic-stack text
def prompt_messages(trace: dict) -> list[dict]:
    """Everything before the final assistant answer."""
    msgs = trace["messages"]
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs


def answer(trace: dict) -> str:
    """The final assistant turn as the text a model should produce: its content, and its tool calls written
    the way the chat template renders them (render_tool_call): for an agent, a call is a complete answer."""
    msgs = trace["messages"]
    if not msgs or msgs[-1]["role"] != "assistant":
        return ""
    return reference_text(msgs[-1]) if msgs[-1].get("tool_calls") else msgs[-1]["content"]


def render(messages: Iterable[dict], roles: tuple[str, ...] = ("user", "assistant", "tool")) -> str:
    """A plain-text transcript of the turns (tool calls shown as name(arguments))."""
    lines = []
    for m in messages:
        if m["role"] not in roles:
            continue
        if m.get("content"):
            lines.append(m["content"] if m["role"] == "user" and len(lines) == 0 else f"[{m['role']}] {m['content']}")
        for call in m.get("tool_calls") or ():
            lines.append(f"[tool_call] {call['function']['name']}({call['function']['arguments']})")
    return "\n".join(lines)


def instruction_of(trace: dict) -> str:
    """The system turns: agentic-stack's instruction."""
    return "\n".join(m["content"] for m in trace["messages"] if m["role"] == "system")
