"""Parse every accepted raw trace shape into one canonical (not yet redacted) trace dict.

Accepted as they are: agentic-stack approved runs; openclaw `messages`, `conversation` and
`user`+`assistant` rows; ShareGPT `conversations` (from/value, function_call, observation);
OpenAI fine-tuning rows with `tools` and assistant `tool_calls` (arguments as JSON strings,
double-encoded ones included). Anything else raises ParseError with a reason the stage counts.
"""
from __future__ import annotations

from typing import Any

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


def _content(val: Any, where: str) -> str:
    if val is None:
        return ""
    if isinstance(val, str):
        return val
    if isinstance(val, list):  # OpenAI content parts: keep the text parts, in order
        parts = []
        for part in val:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise ParseError("wrong_type", f"{where}: unsupported content part")
        return "\n".join(parts)
    raise ParseError("wrong_type", f"{where}: content must be a string, got {type(val).__name__}")


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


def _messages(val: Any, key: str) -> list[dict]:
    if not isinstance(val, list):
        raise ParseError("wrong_type", f"'{key}' must be a list")
    out = []
    for i, m in enumerate(val):
        if not isinstance(m, dict):
            raise ParseError("wrong_type", f"{key}[{i}] must be an object")
        # The common case (a known role, string content, no tool calls) skips building the
        # `key[i]` text that only an error message needs.
        role = m.get("role", m.get("from"))
        role = _ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
        content = m.get("content", m.get("value"))
        msg: dict[str, Any] = {"role": role if role is not None else _role(m.get("role", m.get("from")), f"{key}[{i}]"),
                               "content": content if isinstance(content, str) else _content(content, f"{key}[{i}]")}
        if m.get("tool_calls") is not None:
            calls = _tool_calls(m["tool_calls"], f"{key}[{i}]")
            if calls:
                msg["tool_calls"] = calls
        for k in ("tool_call_id", "name"):
            if isinstance(m.get(k), str):
                msg[k] = m[k]
        out.append(msg)
    return out


def _sharegpt(val: Any) -> list[dict]:
    if not isinstance(val, list):
        raise ParseError("wrong_type", "'conversations' must be a list")
    out: list[dict] = []
    pending: list[str] = []  # ids of function calls still waiting for their observation
    for i, turn in enumerate(val):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise ParseError("wrong_type", f"{where} must be an object")
        who = turn.get("from", turn.get("role"))
        value = _content(turn.get("value", turn.get("content")), where)
        if who == "function_call":
            try:
                call = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise ParseError("invalid_tool_call", f"{where}: function_call value is not JSON") from None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ParseError("invalid_tool_call", f"{where}: function_call has no name")
            cid = f"call_{i + 1}"
            pending.append(cid)
            out.append({"role": "assistant", "content": "", "tool_calls": [{
                "id": cid, "type": "function",
                "function": {"name": call["name"], "arguments": normalize_arguments(call.get("arguments", {}))}}]})
        else:
            role = _role(who, where)
            msg = {"role": role, "content": value}
            if role == "tool" and pending:
                msg["tool_call_id"] = pending.pop(0)
            out.append(msg)
    return out


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


_META = frozenset(("id", "created_at", "project", "domain", "workflow", "task_category", "outcome", "source",
                   "harness", "human_review", "review", "messages", "conversation", "conversations", "user",
                   "assistant", "system", "tools", "input_redacted", "output_approved", "instruction"))


def normalize(rec: dict[str, Any]) -> dict[str, Any]:
    """One raw record -> canonical fields (format, messages, metadata, extra). Raises ParseError."""
    if "output_approved" in rec or "input_redacted" in rec:
        return _approved_run(rec)
    if "conversations" in rec:
        fmt, messages = "sharegpt", _sharegpt(rec["conversations"])
        system = _str(rec, "system")
        if system:
            messages.insert(0, {"role": "system", "content": system})
    elif "messages" in rec:
        messages = _messages(rec["messages"], "messages")
        tooly = "tools" in rec or any("tool_calls" in m or m["role"] == "tool" for m in messages)
        fmt = "openai" if tooly else "openclaw_messages"
    elif "conversation" in rec:
        fmt, messages = "openclaw_conversation", _messages(rec["conversation"], "conversation")
    elif "user" in rec and "assistant" in rec:
        fmt = "openclaw_pair"
        messages = [{"role": "user", "content": _content(rec["user"], "user")},
                    {"role": "assistant", "content": _content(rec["assistant"], "assistant")}]
        system = _str(rec, "system")
        if system:
            messages.insert(0, {"role": "system", "content": system})
    else:
        raise ParseError("unknown_shape", "keys: " + ",".join(sorted(map(str, rec))[:12]))
    workflow = _str(rec, "workflow") or _str(rec, "task_category") or "general"
    return {
        "format": fmt,
        "source_id": _source_id(rec),
        "source": _str(rec, "source") or _str(rec, "harness") or fmt,
        "created_at": _str(rec, "created_at"),
        "project": _str(rec, "project") or "unknown",
        "domain": _str(rec, "domain") or "general",
        "workflow": workflow,
        "task_category": _str(rec, "task_category") or workflow,
        "outcome": _outcome(rec.get("outcome")),
        "review": _review(rec),
        "messages": messages,
        "tools": _tools(rec.get("tools")),
        "extra": {k: v for k, v in rec.items() if k not in _META},
    }


def _source_id(rec: dict) -> str | None:
    sid = rec.get("id")
    if sid is None:
        return None
    if isinstance(sid, bool) or not isinstance(sid, (str, int)):
        raise ParseError("wrong_type", "'id' must be a string")
    return str(sid)


def _approved_run(rec: dict) -> dict[str, Any]:
    try:
        run = ApprovedRun.model_validate(rec)
    except ValidationError as exc:
        errs = exc.errors()
        kinds = {e["type"] for e in errs}
        reason = "missing_fields" if kinds <= {"missing"} else "wrong_type"
        fields = sorted({".".join(map(str, e["loc"])) for e in errs})
        raise ParseError(reason, ",".join(fields)[:200]) from None
    messages = []
    if run.instruction:
        messages.append({"role": "system", "content": run.instruction})
    messages += [{"role": "user", "content": run.input_redacted},
                 {"role": "assistant", "content": run.output_approved}]
    # instruction/input/output became the messages; the rest (rules, summaries, flags) rides along.
    extra = {k: v for k, v in rec.items() if k not in _META}
    return {
        "format": "approved_run",
        "source_id": run.id,
        "source": run.harness or "approved_run",
        "created_at": run.created_at,
        "project": run.project or "unknown",
        "domain": run.domain,
        "workflow": run.workflow,
        "task_category": rec["task_category"] if isinstance(rec.get("task_category"), str) else run.workflow,
        "outcome": _outcome(rec.get("outcome")),
        "review": _review(rec),
        "messages": messages,
        "tools": None,
        "extra": extra,
    }
