"""stages.chat: one tool-call text format, rendered by the embedded template and by reference_text() alike, and
parsed back from generated text."""
from __future__ import annotations

import pytest

from stages.basemodel import CHAT_TEMPLATE
from stages.chat import canonical_json, normalize_tool_calls, parse_tool_calls, parse_tools, reference_text


def _calls():
    return [{"id": "a", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "é1"}'}},
            {"id": "b", "type": "function", "function": {"name": "x", "arguments": "not json"}}]


@pytest.mark.parametrize("content", ["", "Let me look.", None])
def test_embedded_template_renders_reference_text(content):
    from transformers.utils.chat_template_utils import _compile_jinja_template
    msg = {"role": "assistant", "content": content, "tool_calls": _calls()}
    clean = dict(msg, content=content or "", tool_calls=normalize_tool_calls(msg["tool_calls"]))
    out = _compile_jinja_template(CHAT_TEMPLATE).render(messages=[clean], add_generation_prompt=False)
    assert out.startswith("<|assistant|>") and out.endswith("<|end|>")
    assert out[len("<|assistant|>"):-len("<|end|>")] == reference_text(msg)


def test_reference_text_round_trips_through_the_parser():
    calls, bad = parse_tool_calls(reference_text({"role": "assistant", "content": "ok", "tool_calls": _calls()}))
    assert bad == 0
    assert calls == [{"name": "lookup", "arguments": {"q": "é1"}}, {"name": "x", "arguments": "not json"}]


def test_parser_counts_broken_and_cut_off_blocks():
    text = ('<tool_call>{"name": "a", "arguments": {}}</tool_call> <tool_call>{"name": 3}</tool_call>'
            '<tool_call>not json</tool_call><tool_call>{"name": "b", "arguments": "{\\"k\\": [1]}"}')
    calls, bad = parse_tool_calls(text)
    assert calls == [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": [1]}}]
    assert bad == 2
    assert parse_tool_calls("plain answer") == ([], 0)


def test_parse_tools_and_canonical_json():
    assert parse_tools('[{"type": "function"}]') == [{"type": "function"}]
    assert parse_tools("not json") is None and parse_tools([]) is None
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'
