"""Parse every accepted raw trace shape into one canonical (not yet redacted) trace dict.

Accepted as they are, a trace a line: agentic-stack approved runs; openclaw `messages`, `conversation` and
`user`+`assistant` rows; ShareGPT `conversations` (from/value, function_call, observation) and LLaMA-Factory's
typed parts ({"type", "value"}); OpenAI chat rows with `tools` and `tool_calls` (arguments as JSON strings,
double-encoded ones included), legacy `functions`/`function_call`/role `function` and typed content parts;
OpenAI Responses API requests (`input`/`output` items); Anthropic Messages transcripts (system blocks,
tool_use/tool_result, thinking, images); Hermes `<tool_call>`/`<tool_response>` tags, parsed into real calls.
A session a file: Claude Code session logs and Codex CLI rollouts (`sniff_file`, `session_traces`).

Nothing is dropped silently: what is not a turn goes under `extra` and is counted under `omitted`; what can't be
mapped raises ParseError with a reason (and the field) that the stage counts.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from typing import Any, Iterable

import orjson
from pydantic import ValidationError

from schemas.records import ApprovedRun


class ParseError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
_OUTCOMES = {
    "success": "success", "succeeded": "success", "ok": "success", "passed": "success", "pass": "success",
    "completed": "success", "failed": "failed", "failure": "failed", "fail": "failed", "error": "failed",
}
_REVIEW = {"accepted": "accepted", "approved": "accepted", "edited": "edited", "rejected": "rejected",
           "declined": "rejected"}


def parse_line(raw: bytes) -> dict[str, Any]:
    """bytes of one JSONL line -> the JSON object. Strict: NaN/Infinity are not JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError("invalid_utf8", f"byte {exc.start}") from None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ParseError("invalid_json", str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise ParseError("not_an_object", type(obj).__name__)
    return obj


def _str(rec: dict, key: str, default: str | None = None) -> str | None:
    val = rec.get(key, default)
    if val is None:
        return default
    if not isinstance(val, str):
        raise ParseError("wrong_type", f"'{key}' must be a string, got {type(val).__name__}")
    return val


def normalize_arguments(args: Any) -> str:
    """Tool-call arguments -> one level of JSON text; undoes double encoding.

    Text that isn't JSON is kept as a JSON string so the field stays valid JSON either way.
    """
    for _ in range(3):
        if not isinstance(args, str):
            break
        try:
            args = orjson.loads(args)
        except orjson.JSONDecodeError:
            break
    return orjson.dumps(args, option=orjson.OPT_SORT_KEYS).decode()


def arguments_as_values(messages: list[dict]) -> None:
    """Parse normalised tool-call arguments (JSON text) in place, so that redaction sees them value by value."""
    for m in messages:
        for call in m.get("tool_calls") or ():
            call["function"]["arguments"] = orjson.loads(call["function"]["arguments"])


def arguments_as_text(messages: list[dict]) -> None:
    """The inverse of arguments_as_values: tool-call arguments back to normalised JSON text, in place."""
    for m in messages:
        for call in m.get("tool_calls") or ():
            call["function"]["arguments"] = normalize_arguments(call["function"]["arguments"])


def _tool_calls(val: Any, where: str) -> list[dict] | None:
    if val is None:
        return None
    if not isinstance(val, list):
        raise ParseError("wrong_type", f"{where}: tool_calls must be a list")
    calls = []
    for i, call in enumerate(val):
        if not isinstance(call, dict):
            raise ParseError("wrong_type", f"{where}: tool_calls[{i}] must be an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ParseError("wrong_type", f"{where}: tool_calls[{i}] has no function name")
        cid = call.get("id")
        calls.append({
            "id": cid if isinstance(cid, str) and cid else f"call_{i + 1}",
            "type": "function",
            "function": {"name": fn["name"], "arguments": normalize_arguments(fn.get("arguments", {}))},
        })
    return calls or None


def _role(val: Any, where: str) -> str:
    role = _ROLE_ALIASES.get(val.lower()) if isinstance(val, str) else None
    if role is None:
        raise ParseError("bad_role", f"{where}: {str(val)[:40]!r}")
    return role




def _tools(val: Any) -> list[dict] | None:
    if val is None or val == "" or val == []:
        return None
    if isinstance(val, str):  # ShareGPT keeps the tool list as a JSON string
        try:
            val = orjson.loads(val)
        except orjson.JSONDecodeError:
            raise ParseError("wrong_type", "'tools' is not valid JSON") from None
    if isinstance(val, dict):
        val = [val]
    if not isinstance(val, list) or not all(isinstance(t, dict) for t in val):
        raise ParseError("wrong_type", "'tools' must be a list of objects")
    return val


def _review(rec: dict) -> dict:
    hr = rec.get("human_review", rec.get("review"))
    if hr is None:
        return {"status": "unknown"}
    if isinstance(hr, str):
        hr = {"status": hr}
    if not isinstance(hr, dict):
        raise ParseError("wrong_type", "'human_review' must be an object")
    status = hr.get("status", "unknown")
    out = {"status": _REVIEW.get(status.lower(), "unknown") if isinstance(status, str) else "unknown"}
    for src, dst in (("review_notes", "notes"), ("notes", "notes"), ("edit_distance_estimate", "edit_distance_estimate")):
        if isinstance(hr.get(src), str):
            out[dst] = hr[src]
    return out


def _outcome(val: Any) -> str:
    return _OUTCOMES.get(val.lower(), "unknown") if isinstance(val, str) else "unknown"


# ---------------------------------------------------------------- content parts and what is kept aside
# What does not become a message is kept under the trace's `extra` (redacted like everything else) and
# counted under `omitted`, by kind: thinking/reasoning (not trained on: a model's private scratchpad, and
# often signed or encrypted), images (a placeholder in the text; the bytes of an inline image are not kept,
# only their type and size), tool errors, fields we don't map. Nothing is dropped without a count.
IMAGE_PLACEHOLDER = "[image]"
AUDIO_PLACEHOLDER = "[audio]"
_USE_PARTS = frozenset(("tool_use", "server_tool_use", "mcp_tool_use"))
_AUDIO_PARTS = frozenset(("input_audio", "audio"))
_TEXT_PARTS = frozenset(("text", "input_text", "output_text", "summary_text", "reasoning_text"))
_THINKING_PARTS = frozenset(("thinking", "redacted_thinking", "reasoning"))
_IMAGE_PARTS = frozenset(("image", "image_url", "input_image"))
_MESSAGE_KEYS = frozenset(("role", "from", "content", "value", "tool_calls", "tool_call_id", "name", "function_call"))
_PLAIN_KEYS = frozenset(("role", "from", "content", "value", "tool_call_id", "name"))


class _Ctx:
    """What one record puts aside while its messages are built: `extra` entries and `omitted` counts."""

    __slots__ = ("extra", "omitted", "n_calls", "anthropic")

    def __init__(self) -> None:
        self.extra: dict[str, list] = {}
        self.omitted: Counter = Counter()
        self.n_calls = 0
        self.anthropic = False  # a block only Anthropic's API writes was seen (tool_use, tool_result, thinking)

    def keep(self, kind: str, item: Any, count: str | None = None) -> None:
        self.extra.setdefault(kind, []).append(item)
        if count:
            self.omitted[count] += 1

    def call_id(self) -> str:
        self.n_calls += 1
        return f"call_{self.n_calls}"


def _image(part: dict, where: str, ctx: _Ctx) -> str:
    """An image part -> the placeholder; its metadata (never inline bytes) kept and counted."""
    meta: dict[str, Any] = {"at": where, "type": part.get("type")}
    src = part.get("source") if isinstance(part.get("source"), dict) else None
    url = part.get("image_url")
    if isinstance(url, dict):
        meta.update({k: v for k, v in url.items() if k != "url"})  # detail, ...
        url = url.get("url")
    if src is not None:
        meta.update({k: v for k, v in src.items() if k != "data"})
        if isinstance(src.get("data"), str):
            meta["inline_bytes"] = len(src["data"])
    elif isinstance(url, str):
        if url.startswith("data:"):
            meta["media_type"] = url[5:].split(";", 1)[0]
            meta["inline_bytes"] = len(url)
        else:
            meta["url"] = url
    rest = {k: v for k, v in part.items() if k not in ("type", "source", "image_url")}
    if rest:
        meta["fields"] = rest
    ctx.keep("images", meta, "image")
    return IMAGE_PLACEHOLDER


def _tool_result_text(val: Any, where: str, ctx: _Ctx) -> str:
    if val is None or isinstance(val, str):
        return val or ""
    if isinstance(val, list):
        return _parts(val, where, ctx)[0]
    if isinstance(val, (dict, int, float, bool)):  # a structured result: keep it as JSON text
        return orjson.dumps(val, option=orjson.OPT_SORT_KEYS).decode()
    raise ParseError("wrong_type", f"{where}: tool result content")


def _parts(val: list, where: str, ctx: _Ctx) -> tuple[str, list[dict], list[dict]]:
    """Typed content parts (OpenAI, Anthropic, Responses, LLaMA-Factory `value`) -> (text, tool calls,
    tool results). An unknown part type is a reject naming it, never skipped."""
    texts: list[str] = []
    calls: list[dict] = []
    results: list[dict] = []
    for j, part in enumerate(val):
        at = f"{where}.content[{j}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ParseError("wrong_type", f"{at}: a content part must be an object or a string")
        kind = part.get("type", "text" if "text" in part else None)
        body = part.get("text", part.get("value"))
        if kind in _ANTHROPIC_BLOCKS:
            ctx.anthropic = True
        if kind in _TEXT_PARTS and isinstance(body, str):
            texts.append(body)
            rest = {k: v for k, v in part.items() if k not in ("type", "text", "value")}
            if rest:  # annotations, cache_control, citations...
                ctx.keep("part_fields", {"at": at, **rest})
        elif kind in _THINKING_PARTS:
            ctx.keep("thinking", {"at": at, **{k: v for k, v in part.items() if k != "type"}}, "thinking")
        elif kind in _IMAGE_PARTS:
            texts.append(_image(part, at, ctx))
        elif kind in _USE_PARTS:
            calls.append(_use_part(part, at, ctx))
        elif kind == "tool_call":  # LLaMA-Factory: {"type": "tool_call", "value": "{\"name\": ..., \"arguments\": ...}"}
            calls.append(_call_from_json(body, at, ctx))
        elif isinstance(kind, str) and kind.endswith("tool_result"):  # tool_, web_search_tool_, mcp_tool_result...
            results.append(_result_part(part, at, ctx))
        elif kind == "refusal" and isinstance(part.get("refusal"), str):  # OpenAI: the assistant's refusal is its text
            texts.append(part["refusal"])
        elif kind in _AUDIO_PARTS:  # like an image: a placeholder, the format and size kept, not the bytes
            inner = part.get(kind) if isinstance(part.get(kind), dict) else {}
            meta = {"at": at, **{k: v for k, v in inner.items() if k != "data"},
                    **{k: v for k, v in part.items() if k not in ("type", kind)}}
            if isinstance(inner.get("data"), str):
                meta["inline_bytes"] = len(inner["data"])
            ctx.keep("audio", meta, "audio")
            texts.append(AUDIO_PLACEHOLDER)
        else:
            raise ParseError("unsupported_part", f"{at}: type {str(kind)[:40]!r}")
    return "\n".join(texts), calls, results


def _use_part(part: dict, at: str, ctx: _Ctx) -> dict:
    """Anthropic's tool_use (server_tool_use, mcp_tool_use: the same shape, run elsewhere) -> a call."""
    if not isinstance(part.get("name"), str):
        raise ParseError("invalid_tool_call", f"{at}: {part.get('type')} has no name")
    cid = part.get("id") if isinstance(part.get("id"), str) and part["id"] else ctx.call_id()
    rest = {k: v for k, v in part.items() if k not in ("type", "id", "name", "input")}
    if rest or part.get("type") != "tool_use":
        ctx.keep("part_fields", {"at": at, "type": part.get("type"), **rest})
    return {"id": cid, "type": "function",
            "function": {"name": part["name"], "arguments": normalize_arguments(part.get("input", {}))}}


def _result_part(part: dict, at: str, ctx: _Ctx) -> dict:
    """A tool_result block (or a server tool's `*_tool_result`) -> a tool turn; `is_error` kept and counted."""
    content = part.get("content")
    if part.get("type") != "tool_result" and not isinstance(content, (str, type(None))):
        content = orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode()  # a server tool's own result shape
    res = {"role": "tool", "content": _tool_result_text(content, at, ctx)}
    if isinstance(part.get("tool_use_id"), str):
        res["tool_call_id"] = part["tool_use_id"]
    if part.get("is_error") is True:
        ctx.keep("tool_errors", part.get("tool_use_id"), "tool_error")
    rest = {k: v for k, v in part.items() if k not in ("type", "tool_use_id", "content", "is_error")}
    if rest or part.get("type") != "tool_result":
        ctx.keep("part_fields", {"at": at, "type": part.get("type"), **rest})
    return res


def _call_from_json(body: Any, where: str, ctx: _Ctx) -> dict:
    call = body
    if isinstance(body, str):
        try:
            call = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ParseError("invalid_tool_call", f"{where}: a tool call is not JSON") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ParseError("invalid_tool_call", f"{where}: a tool call has no name")
    rest = {k: v for k, v in call.items() if k not in ("name", "arguments", "id")}
    if rest:
        ctx.keep("part_fields", {"at": where, **rest})
    cid = call.get("id") if isinstance(call.get("id"), str) and call["id"] else ctx.call_id()
    return {"id": cid, "type": "function",
            "function": {"name": call["name"], "arguments": normalize_arguments(call.get("arguments", {}))}}


def _content(val: Any, where: str, ctx: _Ctx) -> tuple[str, list[dict], list[dict]]:
    if val is None:
        return "", [], []
    if isinstance(val, str):
        return val, [], []
    if isinstance(val, list):
        return _parts(val, where, ctx)
    raise ParseError("wrong_type", f"{where}: content must be a string or a list of parts, got {type(val).__name__}")


def _system(val: Any, ctx: _Ctx) -> str:
    """A top-level system prompt: a string, or (Anthropic) a list of text blocks."""
    if val is None or isinstance(val, str):
        return val or ""
    if isinstance(val, list):
        text, calls, results = _parts(val, "system", ctx)
        if calls or results:
            raise ParseError("wrong_type", "system: holds tool blocks")
        return text
    raise ParseError("wrong_type", f"'system' must be a string or a list of blocks, got {type(val).__name__}")


def _messages(val: Any, key: str, ctx: _Ctx) -> list[dict]:
    if not isinstance(val, list):
        raise ParseError("wrong_type", f"'{key}' must be a list")
    out: list[dict] = []
    pending: list[tuple[str, str]] = []  # (call id, function name) of calls still waiting for a result
    for i, m in enumerate(val):
        if not isinstance(m, dict):
            raise ParseError("wrong_type", f"{key}[{i}] must be an object")
        where = f"{key}[{i}]"
        content = m.get("content", m.get("value"))
        role = m.get("role", m.get("from"))
        role = _ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
        if role is None:
            role = _role(m.get("role", m.get("from")), where)
        if isinstance(content, str) and len(m) <= 2:
            out.append({"role": role, "content": content})  # the common case, no bookkeeping
            continue
        if isinstance(content, str) and m.keys() <= _PLAIN_KEYS:  # a tool result, a named turn: little to do
            msg = {"role": role, "content": content}
            _ids_and_pairing(msg, m, role, pending)
            out.append(msg)
            continue
        text, calls, results = _content(content, where, ctx)
        if m.get("tool_calls") is not None:
            calls = (_tool_calls(m["tool_calls"], where) or []) + calls
        if m.get("function_call") is not None:  # OpenAI's legacy single call
            calls.append(_call_from_json(m["function_call"], f"{where}.function_call", ctx))
        out.extend(results)  # Anthropic: tool results ride in a user turn, before its text
        msg: dict[str, Any] = {"role": role, "content": text}
        if calls:
            msg["tool_calls"] = calls
        _ids_and_pairing(msg, m, role, pending)
        if not m.keys() <= _MESSAGE_KEYS:  # weight, refusal, reasoning_content, annotations...: kept, not lost
            ctx.keep("message_fields", {"at": where, **{k: v for k, v in m.items() if k not in _MESSAGE_KEYS}})
        if role == "user" and results and not text.strip() and not calls:
            pass  # a user turn that only carried tool results
        else:
            out.append(msg)
        for c in calls:
            pending.append((c["id"], c["function"]["name"]))
        for r in results:
            _drop_pending(pending, r.get("tool_call_id"))
    return out


def _match_result(msg: dict, pending: list[tuple[str, str]], name: Any) -> None:
    """A tool result with no call id (legacy role `function`, ShareGPT observations): the oldest pending call
    of that name, else the oldest pending call."""
    for k, (cid, fname) in enumerate(pending):
        if not isinstance(name, str) or fname == name:
            msg["tool_call_id"] = cid
            del pending[k]
            return
    if pending:
        msg["tool_call_id"] = pending.pop(0)[0]


def _ids_and_pairing(msg: dict[str, Any], m: dict, role: str, pending: Any) -> None:
    """Copy a message's call id and name, and pair a tool result with the call it answers (by id, else by name)."""
    for k in ("tool_call_id", "name"):
        if isinstance(m.get(k), str):
            msg[k] = m[k]
    if role == "tool":
        if "tool_call_id" in msg:
            _drop_pending(pending, msg["tool_call_id"])
        else:
            _match_result(msg, pending, m.get("name"))


def _drop_pending(pending: list[tuple[str, str]], cid: Any) -> None:
    for k, (c, _) in enumerate(pending):
        if c == cid:
            del pending[k]
            return


_TURN_KEYS = frozenset(("from", "role", "value", "content"))


def _sharegpt(val: Any, ctx: _Ctx) -> list[dict]:
    if not isinstance(val, list):
        raise ParseError("wrong_type", "'conversations' must be a list")
    out: list[dict] = []
    pending: list[tuple[str, str]] = []
    for i, turn in enumerate(val):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise ParseError("wrong_type", f"{where} must be an object")
        who = turn.get("from", turn.get("role"))
        if not turn.keys() <= _TURN_KEYS:
            ctx.keep("message_fields", {"at": where, **{k: v for k, v in turn.items() if k not in _TURN_KEYS}})
        if who == "function_call":
            call = _call_from_json(turn.get("value", turn.get("content")), where, ctx)
            call["id"] = f"call_{i + 1}"
            pending.append((call["id"], call["function"]["name"]))
            out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            continue
        text, calls, results = _content(turn.get("value", turn.get("content")), where, ctx)
        role = _role(who, where)
        out.extend(results)
        msg: dict[str, Any] = {"role": role, "content": text}
        if calls:
            msg["tool_calls"] = calls
            pending += [(c["id"], c["function"]["name"]) for c in calls]
        if role == "tool":
            _match_result(msg, pending, None)
        out.append(msg)
    return out


# ---------------------------------------------------------------- Hermes / NousResearch tags
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_HERMES_RESP = re.compile(r"<tool_response>\s*(.*?)\s*</tool_response>", re.S)


def _loose_json(text: str) -> Any:
    """JSON, or a Python literal (Hermes data often writes `{'name': ...}`); None when neither parses."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def hermes(messages: list[dict], ctx: _Ctx) -> bool:
    """`<tool_call>{json}</tool_call>` in assistant text -> real calls with ids; `<tool_response>` turns -> tool
    messages answering them in order. A block that does not parse stays text. True when anything changed."""
    for m in messages:  # most traces have no tag at all: one scan for it before any bookkeeping
        if "<tool_" in (m.get("content") or ""):
            break
    else:
        return False
    changed = False
    out: list[dict] = []
    pending: list[tuple[str, str]] = []
    for m in messages:
        text = m.get("content") or ""
        if m["role"] == "assistant" and not m.get("tool_calls") and "<tool_call>" in text:
            calls, keep = [], []
            pos = 0
            for hit in _HERMES_CALL.finditer(text):
                obj = _loose_json(hit.group(1))
                if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                    keep.append(text[pos:hit.start()])
                    pos = hit.end()
                    calls.append(_call_from_json(obj, "hermes tool_call", ctx))
            if calls:
                keep.append(text[pos:])
                m = {**m, "content": "".join(keep).strip(), "tool_calls": calls}
                pending += [(c["id"], c["function"]["name"]) for c in calls]
                changed = True
        elif m["role"] in ("tool", "user") and "<tool_response>" in text and (pending or m["role"] == "tool"):
            bodies = _HERMES_RESP.findall(text)
            outside = _HERMES_RESP.sub("", text).strip()
            if bodies and not outside:
                for body in bodies:
                    obj = _loose_json(body)
                    name = obj.get("name") if isinstance(obj, dict) else None
                    msg = {"role": "tool", "content": body}
                    _match_result(msg, pending, name)
                    out.append(msg)
                changed = True
                continue
        out.append(m)
    messages[:] = out
    return changed


# ---------------------------------------------------------------- OpenAI Responses API items (Codex CLI too)
_ITEM_CALLS = {"function_call": "arguments", "custom_tool_call": "input", "local_shell_call": "action"}
_ITEM_OUTPUTS = frozenset(("function_call_output", "custom_tool_call_output", "local_shell_call_output"))


def responses_items(items: list, where: str, ctx: _Ctx) -> list[dict]:
    """Responses API items -> messages. Calls join the assistant turn they follow (parallel calls share one);
    reasoning is kept aside and counted; an item of an unknown type is kept under extra and counted."""
    out: list[dict] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if isinstance(item, str):  # `input` may be a bare string
            out.append({"role": "user", "content": item})
            continue
        if not isinstance(item, dict):
            raise ParseError("wrong_type", f"{at} must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = _role(item.get("role"), at)
            text, calls, results = _content(item.get("content"), at, ctx)
            out.extend(results)
            msg: dict[str, Any] = {"role": role, "content": text}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            rest = {k: v for k, v in item.items() if k not in ("type", "role", "content")}
        elif kind in _ITEM_CALLS:
            name = item.get("name", "local_shell" if kind == "local_shell_call" else None)
            if not isinstance(name, str):
                raise ParseError("invalid_tool_call", f"{at}: {kind} has no name")
            cid = item.get("call_id") or item.get("id")
            call = {"id": cid if isinstance(cid, str) and cid else ctx.call_id(), "type": "function",
                    "function": {"name": name, "arguments": normalize_arguments(item.get(_ITEM_CALLS[kind], {}))}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            rest = {k: v for k, v in item.items() if k not in ("type", "name", "call_id", _ITEM_CALLS[kind])}
        elif kind in _ITEM_OUTPUTS:
            msg = {"role": "tool", "content": _tool_result_text(item.get("output"), at, ctx)}
            if isinstance(item.get("call_id"), str):
                msg["tool_call_id"] = item["call_id"]
            out.append(msg)
            rest = {k: v for k, v in item.items() if k not in ("type", "call_id", "output")}
        elif kind == "reasoning":
            ctx.keep("thinking", {"at": at, **{k: v for k, v in item.items() if k != "type"}}, "thinking")
            continue
        else:  # web_search_call, mcp_call, item_reference, compaction...: not a turn we can train on
            ctx.keep("items", {"at": at, **item}, f"item_{str(kind)[:40]}")
            continue
        if rest:
            ctx.keep("item_fields", {"at": at, **rest})
    return out


def _responses_tools(val: Any) -> Any:
    """Responses-style flat tool schemas ({"type": "function", "name", "parameters"}) and Anthropic's
    ({"name", "input_schema"}) -> the chat shape every template reads; anything else as it is."""
    if not isinstance(val, list):
        return val
    out = []
    for t in val:
        if isinstance(t, dict) and "function" not in t and isinstance(t.get("name"), str):
            fn = {k: v for k, v in t.items() if k not in ("type", "input_schema")}
            if "input_schema" in t:
                fn["parameters"] = t["input_schema"]
            out.append({"type": "function", "function": fn} if t.get("type", "function") in ("function", "custom")
                       or "input_schema" in t else t)
        else:
            out.append(t)
    return out


# ---------------------------------------------------------------- one record -> canonical fields
_COMMON = frozenset(("id", "created_at", "project", "domain", "workflow", "task_category", "outcome", "source",
                     "harness", "human_review", "review", "tools", "functions"))
_ANTHROPIC_BLOCKS = frozenset(("tool_use", "tool_result", "thinking", "redacted_thinking", "server_tool_use",
                               "web_search_tool_result", "mcp_tool_use", "mcp_tool_result"))


def _anthropic_like(rec: dict, ctx: _Ctx) -> bool:
    if ctx.anthropic or isinstance(rec.get("system"), list):
        return True
    tools = rec.get("tools")
    return isinstance(tools, list) and any(isinstance(t, dict) and "input_schema" in t for t in tools)


_USED_SHAREGPT = _COMMON | {"conversations", "system"}
_USED_MESSAGES = _COMMON | {"messages", "system"}
_USED_CONVERSATION = _COMMON | {"conversation"}
_USED_RESPONSES = _COMMON | {"input", "output", "instructions"}
_USED_PAIR = _COMMON | {"user", "assistant", "system"}


def _shape(rec: dict, ctx: _Ctx) -> tuple[str, list[dict], frozenset]:
    """(format, messages, the record keys they consumed, the common metadata keys included)."""
    if "conversations" in rec:
        messages = _sharegpt(rec["conversations"], ctx)
        return "sharegpt", _with_system(messages, _system(rec.get("system"), ctx)), _USED_SHAREGPT
    if "messages" in rec:
        messages = _messages(rec["messages"], "messages", ctx)
        if _anthropic_like(rec, ctx):
            fmt = "anthropic"
        elif "tools" in rec or "functions" in rec or any("tool_calls" in m or m["role"] == "tool" for m in messages):
            fmt = "openai"
        else:
            fmt = "openclaw_messages"
        return fmt, _with_system(messages, _system(rec.get("system"), ctx)), _USED_MESSAGES
    if "conversation" in rec:
        return "openclaw_conversation", _messages(rec["conversation"], "conversation", ctx), _USED_CONVERSATION
    if isinstance(rec.get("input"), list) or (isinstance(rec.get("input"), str) and isinstance(rec.get("output"), list)):
        items = ([rec["input"]] if isinstance(rec["input"], str) else rec["input"]) + list(rec.get("output") or [])
        messages = responses_items(items, "input", ctx)
        return "responses", _with_system(messages, _system(rec.get("instructions"), ctx)), _USED_RESPONSES
    if "user" in rec and "assistant" in rec:
        messages = []
        for role in ("user", "assistant"):
            text, calls, results = _content(rec[role], role, ctx)
            if calls or results:
                raise ParseError("wrong_type", f"{role}: tool blocks in a user/assistant pair")
            messages.append({"role": role, "content": text})
        return "openclaw_pair", _with_system(messages, _system(rec.get("system"), ctx)), _USED_PAIR
    raise ParseError("unknown_shape", "keys: " + ",".join(sorted(map(str, rec))[:12]))


def _with_system(messages: list[dict], system: str) -> list[dict]:
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def normalize(rec: dict[str, Any]) -> dict[str, Any]:
    """One raw record -> canonical fields (format, messages, metadata, extra, omitted). Raises ParseError."""
    if "output_approved" in rec or "input_redacted" in rec:
        return _approved_run(rec)
    ctx = _Ctx()
    fmt, messages, used = _shape(rec, ctx)
    if hermes(messages, ctx) and fmt in ("sharegpt", "openai", "openclaw_messages", "openclaw_conversation"):
        fmt = "hermes"
    tools = rec.get("tools") if rec.get("tools") not in (None, "", []) else rec.get("functions")
    return _fields(rec, fmt, messages, _tools(_responses_tools(tools)), used, ctx)


_META = ("workflow", "task_category", "source", "harness", "created_at", "project", "domain")


def _check_meta(rec: dict) -> None:
    """Raise what building the fields would raise first, in the same order (a value that is not a string)."""
    if not _str(rec, "workflow"):
        _str(rec, "task_category")
    _source_id(rec)
    if not _str(rec, "source"):
        _str(rec, "harness")
    for key in ("created_at", "project", "domain", "task_category"):
        _str(rec, key)


def _fields(rec: dict, fmt: str, messages: list[dict], tools: list | None, used: frozenset, ctx: _Ctx) -> dict:
    meta = [rec.get(k) for k in _META]
    if not all(v is None or type(v) is str for v in meta):  # rare: find the field to name, as before
        _check_meta(rec)
    workflow, category, source, harness, created_at, project, domain = meta
    workflow = workflow or category or "general"
    extra = {k: v for k, v in rec.items() if k not in used}
    extra.update(ctx.extra)
    _keep_raw(rec, extra)
    return {
        "format": fmt,
        "source_id": _source_id(rec),
        "source": source or harness or fmt,
        "created_at": created_at,
        "project": project or "unknown",
        "domain": domain or "general",
        "workflow": workflow,
        "task_category": category or workflow,
        "outcome": _outcome(rec.get("outcome")),
        "review": _review(rec),
        "messages": messages,
        "tools": tools,
        "extra": extra,
        "omitted": dict(sorted(ctx.omitted.items())),
    }


def _keep_raw(rec: dict, extra: dict) -> None:
    """Values the canonical fields map lossily (an outcome or review status we don't know, review fields we
    don't map) stay under extra as they were."""
    if "outcome" in rec and not (isinstance(rec["outcome"], str) and rec["outcome"].lower() in _OUTCOMES):
        extra["outcome_raw"] = rec["outcome"]
    hr = rec.get("human_review", rec.get("review"))
    if isinstance(hr, dict):
        rest = {k: v for k, v in hr.items() if k not in ("review_notes", "notes", "edit_distance_estimate")
                and not (k == "status" and isinstance(v, str) and (v.lower() in _REVIEW or v.lower() == "unknown"))}
        if rest:
            extra["human_review_raw"] = rest
    elif isinstance(hr, str) and hr.lower() not in _REVIEW:
        extra["human_review_raw"] = hr


def _source_id(rec: dict) -> str | None:
    sid = rec.get("id")
    if sid is None:
        return None
    if isinstance(sid, bool) or not isinstance(sid, (str, int)):
        raise ParseError("wrong_type", "'id' must be a string")
    return str(sid)


_APPROVED_USED = frozenset(("id", "created_at", "project", "domain", "workflow", "task_category", "outcome", "harness",
                            "human_review", "input_redacted", "output_approved", "instruction"))


# ApprovedRun's fields by type. A record whose values all have exactly these types is what the model would
# accept as it is (no coercion, no default that matters here), so it is read without building the model:
# pydantic costs ~5 us a record, a quarter of the bench corpus. Anything else goes through the model,
# which coerces what lax mode allows and names the fields it rejects.
_RUN_STR = ("id", "created_at", "domain", "workflow", "input_redacted", "output_approved", "redaction_status", "pii_level")
_RUN_OPT_STR = ("project", "harness", "skill", "instruction", "input_summary", "output_summary")
_RUN_OPT_BOOL = ("raw_input_stored", "trainable")


def _plain_run(rec: dict) -> bool:
    """Whether ApprovedRun.model_validate(rec) would take every field as it is (tests/test_readers.py)."""
    get = rec.get
    hr = get("human_review")
    return (all(type(get(k)) is str for k in _RUN_STR)
            and all(get(k) is None or type(get(k)) is str for k in _RUN_OPT_STR)
            and all(get(k) is None or type(get(k)) is bool for k in _RUN_OPT_BOOL)
            and type(hr) is dict and ("status" not in hr or type(hr["status"]) is str)
            and all(hr.get(k) is None or type(hr.get(k)) is str for k in ("review_notes", "edit_distance_estimate")))


def _approved_run(rec: dict) -> dict[str, Any]:
    if _plain_run(rec):
        run: Any = rec
    else:
        try:
            model = ApprovedRun.model_validate(rec)
            run = {k: getattr(model, k) for k in _RUN_STR + _RUN_OPT_STR}
        except ValidationError as exc:
            errs = exc.errors()
            kinds = {e["type"] for e in errs}
            reason = "missing_fields" if kinds <= {"missing"} else "wrong_type"
            fields = sorted({".".join(map(str, e["loc"])) for e in errs})
            raise ParseError(reason, ",".join(fields)[:200]) from None
    messages = []
    if run.get("instruction"):
        messages.append({"role": "system", "content": run["instruction"]})
    messages += [{"role": "user", "content": run["input_redacted"]},
                 {"role": "assistant", "content": run["output_approved"]}]
    # instruction/input/output became the messages; the rest (rules, summaries, flags) rides along.
    extra = {k: v for k, v in rec.items() if k not in _APPROVED_USED}
    _keep_raw(rec, extra)
    return {
        "format": "approved_run",
        "source_id": run["id"],
        "source": run.get("harness") or "approved_run",
        "created_at": run["created_at"],
        "project": run.get("project") or "unknown",
        "domain": run["domain"],
        "workflow": run["workflow"],
        "task_category": rec["task_category"] if isinstance(rec.get("task_category"), str) else run["workflow"],
        "outcome": _outcome(rec.get("outcome")),
        "review": _review(rec),
        "messages": messages,
        "tools": None,
        "extra": extra,
        "omitted": {},
    }


# ---------------------------------------------------------------- session files: one trace per session
# Claude Code and Codex CLI write one event per line; a trace is a whole session, so these files are read
# file by file (redact hands each to one worker). Every line ends in a trace (its message, or its event kept
# under the trace's extra) or in a reject.
SESSION_FORMATS = ("claude_code", "codex")
_CODEX_TYPES = frozenset(("session_meta", "response_item", "turn_context", "event_msg", "compacted"))
_ITEM_TYPES = frozenset(("message", "function_call", "function_call_output", "reasoning", "custom_tool_call",
                         "custom_tool_call_output", "local_shell_call", "web_search_call"))
_CC_TYPES = frozenset(("user", "assistant", "system", "summary", "file-history-snapshot", "queue-operation",
                       "progress", "attachment", "result"))
_CC_KEYS = ("sessionId", "session_id", "leafUuid", "uuid")  # session logs; `session_id`: headless stream-json


def sniff(records: Iterable[dict]) -> str:
    """The format of a file from its first records: "claude_code", "codex", or "records" (a trace a line)."""
    for rec in records:
        t = rec.get("type")
        if t in _CODEX_TYPES and "payload" in rec or rec.get("record_type") == "state":
            return "codex"
        if t in _CC_TYPES and any(k in rec for k in _CC_KEYS) and "messages" not in rec:
            return "claude_code"
        if t in _ITEM_TYPES and "messages" not in rec and "conversations" not in rec:
            return "codex"  # bare Responses items, one a line (Codex's first rollout format)
        if "messages" in rec or "conversations" in rec or "conversation" in rec or "input_redacted" in rec:
            return "records"
    return "records"


def sniff_file(path: Any, max_lines: int = 50, max_bytes: int = 1 << 20) -> str:
    recs = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh):
            if n >= max_lines or fh.tell() > max_bytes and recs:
                break
            try:
                recs.append(parse_line(raw.rstrip(b"\r\n").removeprefix(b"\xef\xbb\xbf")))
            except ParseError:
                continue
    return sniff(recs)


def describe_file(path: Any, max_lines: int = 50) -> str:
    """What a file holds, for `make ingest` to say: a session format, or the format of its first record that
    parses, or "unknown" when none of its first lines is a trace we can read."""
    fmt = sniff_file(path, max_lines)
    if fmt in SESSION_FORMATS:
        return fmt
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh):
            if n >= max_lines:
                break
            try:
                return normalize(parse_line(raw.rstrip(b"\r\n").removeprefix(b"\xef\xbb\xbf")))["format"]
            except ParseError:
                continue
    return "unknown"


Parsed = tuple[int, "dict | ParseError"]


def session_traces(fmt: str, lines: list[Parsed]) -> list[tuple[int, dict | ParseError, int]]:
    """(first line, canonical fields or the ParseError of a line, lines it took) for a session file's parsed
    lines. Rejects come back one per line; traces in the order their first line appears."""
    rejects = [(n, r, 1) for n, r in lines if isinstance(r, ParseError)]
    good = [(n, r) for n, r in lines if not isinstance(r, ParseError)]
    groups = _claude_groups(good) if fmt == "claude_code" else _codex_groups(good)
    out: list[tuple[int, dict | ParseError, int]] = list(rejects)
    for events in groups:
        try:
            fields = _claude_trace(events) if fmt == "claude_code" else _codex_trace(events)
        except ParseError as exc:
            out.append((events[0][0], exc, len(events)))
            continue
        out.append((events[0][0], fields, len(events)))
    out.sort(key=lambda x: x[0])
    return out


# ---- Claude Code
def _claude_groups(events: list[tuple[int, dict]]) -> list[list[tuple[int, dict]]]:
    """Events by session: the main thread per sessionId, each sidechain (subagent) per agentId or root.
    Events with no session (summary, file-history-snapshot) join the file's first session."""
    by_uuid = {e["uuid"]: e for _, e in events if isinstance(e.get("uuid"), str)}
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    loose: list[tuple[int, dict]] = []
    for n, e in events:
        sid = e.get("sessionId", e.get("session_id"))
        if not isinstance(sid, str):
            loose.append((n, e))
            continue
        key: tuple = (sid,)
        if _sidechain(e):
            key = (sid, _branch(e, by_uuid))
        groups.setdefault(key, []).append((n, e))
    out = list(groups.values())
    if loose:
        if out:
            out[0] = sorted(out[0] + loose, key=lambda x: x[0])
        else:
            out = [loose]
    return out


def _sidechain(e: dict) -> bool:
    """A subagent's event: `isSidechain` in session logs, `parent_tool_use_id` in headless stream-json."""
    return e.get("isSidechain") is True or isinstance(e.get("parent_tool_use_id"), str)


def _branch(e: dict, by_uuid: dict) -> str:
    for k in ("agentId", "parent_tool_use_id"):
        if isinstance(e.get(k), str):
            return e[k]
    return _root(e, by_uuid)


def _root(e: dict, by_uuid: dict) -> str:
    seen = set()
    while isinstance(e.get("parentUuid"), str) and e["parentUuid"] in by_uuid and e["parentUuid"] not in seen:
        seen.add(e["parentUuid"])
        e = by_uuid[e["parentUuid"]]
    return str(e.get("uuid"))


def _thread(events: list[tuple[int, dict]]) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """(the conversation: root to the last message, in parentUuid order; the events off it: abandoned
    branches after an edit or retry, and events that are not messages)."""
    by_uuid = {e["uuid"]: (n, e) for n, e in events if isinstance(e.get("uuid"), str)}
    msgs = [(n, e) for n, e in events if e.get("type") in ("user", "assistant") and isinstance(e.get("message"), dict)]
    if not msgs:
        return [], events
    if not any("parentUuid" in e for _, e in msgs):  # headless stream-json: no tree, the file's order is the thread
        return msgs, [(n, e) for n, e in events if not (e.get("type") in ("user", "assistant")
                                                         and isinstance(e.get("message"), dict))]
    path, seen = [], set()
    cur: tuple[int, dict] | None = msgs[-1]
    while cur is not None and id(cur[1]) not in seen:
        seen.add(id(cur[1]))
        path.append(cur)
        parent = cur[1].get("parentUuid") or cur[1].get("logicalParentUuid")  # compaction keeps a logical link
        cur = by_uuid.get(parent) if isinstance(parent, str) else None
    path.reverse()
    on = {id(e) for _, e in path}
    return [(n, e) for n, e in path if e.get("type") in ("user", "assistant") and isinstance(e.get("message"), dict)], \
        [(n, e) for n, e in events if id(e) not in on or not (e.get("type") in ("user", "assistant")
                                                                  and isinstance(e.get("message"), dict))]


_CC_MAPPED = ("type", "message", "sessionId", "session_id")


def _no_inline_bytes(obj: Any, ctx: _Ctx) -> Any:
    """An event kept under extra, without inline file bytes (an image Read's `toolUseResult.file.base64`, an image
    block's `source.data` off the thread): their size is kept and counted, as for images in the messages."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in ("base64", "data") and isinstance(v, str) and len(v) > 256 and \
                    (k == "base64" or obj.get("type") == "base64"):
                out[k] = f"[{len(v)} bytes of base64 omitted]"
                ctx.omitted["inline_bytes"] += 1
            else:
                out[k] = _no_inline_bytes(v, ctx)
        return out
    if isinstance(obj, list):
        return [_no_inline_bytes(v, ctx) for v in obj]
    return obj


def _claude_trace(events: list[tuple[int, dict]]) -> dict:
    ctx = _Ctx()
    thread, rest = _thread(events)
    if not thread:
        raise ParseError("no_messages", "a Claude Code session with no user or assistant message")
    messages: list[dict] = []
    last_id = None
    for n, e in thread:
        msg = e["message"]
        role = "assistant" if e["type"] == "assistant" else "user"
        text, calls, results = _content(msg.get("content"), f"line {n}", ctx)
        mid = msg.get("id")
        # Claude Code writes a streamed reply as one event per content block, all with the same message id.
        if role == "assistant" and mid is not None and mid == last_id and messages and messages[-1]["role"] == "assistant":
            prev = messages[-1]
            prev["content"] = "\n".join(t for t in (prev["content"], text) if t)
            if calls:
                prev.setdefault("tool_calls", []).extend(calls)
        else:
            messages.extend(results)
            if text or calls or not results:
                m: dict[str, Any] = {"role": role, "content": text}
                if calls:
                    m["tool_calls"] = calls
                messages.append(m)
        last_id = mid if role == "assistant" else None
        left = {k: v for k, v in e.items() if k not in _CC_MAPPED}
        rest_of_message = {k: v for k, v in msg.items() if k not in ("role", "content")}  # id, model, usage...
        if rest_of_message:
            left["message"] = rest_of_message
        ctx.keep("events", _no_inline_bytes({"line": n, **left}, ctx))
    for n, e in rest:
        ctx.keep("events", _no_inline_bytes({"line": n, **e}, ctx),
                 "off_thread_message" if e.get("type") in ("user", "assistant") else None)
    first = thread[0][1]
    sid = first.get("sessionId", first.get("session_id"))
    side = _sidechain(first)
    if side:
        ctx.omitted["sidechain_events"] += len(events)
    cwd = next((e["cwd"] for _, e in events if isinstance(e.get("cwd"), str)), None)
    fields = _fields({}, "claude_code", messages, None, frozenset(), ctx)
    models = {e["message"].get("model") for _, e in thread if e["type"] == "assistant"} - {None}
    stamp = first.get("timestamp")
    fields.update(
        source_id=(f"{sid}/{_branch(first, {})}" if side else sid) if isinstance(sid, str) else None,
        source="claude_code", created_at=stamp if isinstance(stamp, str) else None,
        project=cwd.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "unknown" if isinstance(cwd, str) else "unknown",
        domain="software", workflow="claude_code_subagent" if side else "claude_code",
        task_category="claude_code_subagent" if side else "claude_code")
    if len(models) == 1:
        fields["extra"]["model_used"] = models.pop()
    return fields


# ---- Codex CLI
def _codex_groups(events: list[tuple[int, dict]]) -> list[list[tuple[int, dict]]]:
    """A rollout file is one session; a second session_meta (a file of several) starts the next."""
    groups: list[list[tuple[int, dict]]] = []
    for n, e in events:
        meta = e.get("type") == "session_meta" or ("id" in e and "timestamp" in e and "type" not in e
                                                      and "record_type" not in e)
        if not groups or (meta and any(_is_meta(x) for _, x in groups[-1])):
            groups.append([])
        groups[-1].append((n, e))
    return groups


def _is_meta(e: dict) -> bool:
    return e.get("type") == "session_meta" or ("id" in e and "timestamp" in e and "type" not in e
                                               and "record_type" not in e)


def _lead_system(messages: list[dict]) -> list[dict]:
    """Developer/system items before the model's first turn (Codex writes its permission and sandbox notes after
    the environment context) move to the front, in order: chat templates take a system prompt only there. Later
    ones stay where they are (build_dataset counts such a trace as `role_order`)."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    head = messages[:first]
    return [m for m in head if m["role"] == "system"] + [m for m in head if m["role"] != "system"] + messages[first:]


def _codex_trace(events: list[tuple[int, dict]]) -> dict:
    ctx = _Ctx()
    items: list[tuple[int, dict]] = []
    meta: dict = {}
    for n, e in events:
        if e.get("type") == "response_item" and isinstance(e.get("payload"), dict):
            items.append((n, e["payload"]))
            left = {k: v for k, v in e.items() if k != "payload"}
            left.pop("type")
            if left:
                ctx.keep("events", {"line": n, **left})
        elif e.get("type") in _ITEM_TYPES or ("role" in e and "content" in e and "type" not in e):
            items.append((n, e))
        elif _is_meta(e):
            meta = e.get("payload") if isinstance(e.get("payload"), dict) else e
            ctx.keep("events", {"line": n, **e})
        else:  # turn_context, event_msg (the UI's copy of the items), compacted, record_type: state
            ctx.keep("events", {"line": n, **e})
    messages = _lead_system(responses_items([p for _, p in items], "items", ctx))
    if not messages:
        raise ParseError("no_messages", "a Codex session with no message item")
    instructions = meta.get("instructions")
    if isinstance(instructions, str) and instructions.strip():
        messages.insert(0, {"role": "system", "content": instructions})
    fields = _fields({}, "codex", messages, None, frozenset(), ctx)
    cwd = meta.get("cwd")
    models = {e["payload"].get("model") for _, e in events if e.get("type") == "turn_context"
              and isinstance(e.get("payload"), dict)} - {None}
    sid, stamp = meta.get("id"), meta.get("timestamp")
    fields.update(
        source_id=str(sid) if isinstance(sid, (str, int)) else None, source="codex",
        created_at=stamp if isinstance(stamp, str) else None,
        project=cwd.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "unknown" if isinstance(cwd, str) else "unknown",
        domain="software", workflow="codex", task_category="codex")
    if len(models) == 1:
        fields["extra"]["model_used"] = models.pop()
    return fields
