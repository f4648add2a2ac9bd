"""train (and an end-to-end train -> eval -> gate) on a tiny CPU fixture, with the embedded base.

Kept small: one tiny training in this process, an identical one in a subprocess (another hash seed, another
thread count) for the byte-for-byte determinism check, and one eval of the first (the session fixtures tiny, two_runs and model_half in
conftest.py, which test_handoffs.py reuses).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from model_fixture import INTENT_SYS
from schemas.training import EvalResults, TrainParams
from stages import train as T



def _files(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_two_cpu_trainings_are_byte_identical(two_runs):
    """Another process, another hash seed and another thread count (1 and 2): the same bytes, apart from the
    lines that record cpu_threads itself (the adapter's model card lists train's params)."""
    a, b = (_files(r) for r in two_runs)
    assert "data/train/adapter/adapter_model.safetensors" in a and "data/base/model.safetensors" in a
    assert sorted(a) == sorted(b)
    differing = {k: [(x, y) for x, y in zip(a[k].splitlines(), b[k].splitlines()) if x != y]
                 for k in a if a[k] != b[k]}
    assert differing == {"data/train/adapter/README.md": [(b"cpu_threads: 1", b"cpu_threads: 2")]}


def test_cpu_math_does_not_depend_on_the_thread_count():
    """A LoRA-shaped weight gradient (a long reduction over batch x sequence) gives the same bits with 1 and 2
    threads once pin_cpu_math() has run: what lets clones on machines with other core counts, or an MKL that
    changes its thread count at run time, write the same adapter. (Without it, MKL 2024.2 in torch 2.13's CPU
    wheel gives different bits for this product on the 2-core CI machine.)"""
    code = (
        "from stages.basemodel import pin_cpu_math\n"
        "pin_cpu_math()\n"
        "import torch\n"
        "g = torch.Generator().manual_seed(0)\n"
        "a, b = torch.randn(8192, 576, generator=g), torch.randn(8192, 192, generator=g)\n"
        "out = []\n"
        "for t in (1, 2):\n"
        "    torch.set_num_threads(t)\n"
        "    out.append(a.t() @ b)\n"
        "print(torch.equal(*out))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MKL_")} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def test_train_outputs(two_runs, tiny):
    run, _ = two_runs
    folder, paths = tiny
    adapter = run / "data/train/adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "README.md"):
        assert (adapter / name).is_file(), name
    assert not (adapter / "training_args.bin").exists()
    base = json.loads((run / "data/base/model.json").read_text())
    assert base["kind"] == "embedded" and base["has_generation_markers"] and "model.safetensors" in base["files"]
    info = json.loads((run / "data/train/model.json").read_text())
    assert info["base_model"] == {"name": "embedded", "revision": None, "weights_digest": base["weights_digest"]}
    assert info["chat_template"]["name"] == "model"  # the embedded template marks the assistant turn itself
    card = (adapter / "README.md").read_text()
    digest = json.loads(paths["manifest"].read_text())["digest"]
    assert f"Dataset digest: {digest}" in card and "Base model: embedded" in card and "learning_rate: 0.01" in card
    metrics = json.loads((run / "metrics/train.json").read_text())
    assert metrics["train_examples"] == 64 and metrics["val_examples"] == 16 and metrics["zero_trainable"] == 0
    assert metrics["device"] == "cpu" and metrics["precision"] == "fp32" and metrics["quantization"] == "none"
    assert metrics["steps"] == 48
    assert not any(k.endswith("seconds") or "per_second" in k for k in metrics)  # timings stay out
    timing = json.loads((folder / "timing_a.json").read_text())  # tokens/s over optimizer steps, val passes apart
    assert timing["val_seconds"] > 0 and timing["train_seconds"] > 0
    assert timing["train_seconds"] + timing["val_seconds"] <= timing["total_seconds"]
    assert timing["train_tokens_per_second"] == pytest.approx(
        metrics["train_tokens"] * metrics["epochs"] / timing["train_seconds"], rel=0.02)
    lines = (run / "metrics/train_loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,val_loss"
    rows = {int(step): (loss, val) for step, loss, val in (line.split(",") for line in lines[1:])}
    assert sorted(rows) == list(range(49))                 # step 0 (the base's val loss), then every step
    assert rows[0][0] == "" and rows[0][1] != ""           # val loss of the base before any update
    assert rows[12][1] != "" and rows[5][1] == ""          # val loss at eval steps, blank elsewhere
    assert metrics["base_val_loss"] == float(rows[0][1])
    assert metrics["val_loss"] < metrics["base_val_loss"]  # the adapter learned something
    for rel, data in _files(run).items():  # no absolute paths in anything written
        if not rel.endswith(".safetensors"):
            assert str(folder).encode() not in data, rel
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])
    assert config["base_model_name_or_path"] == "embedded"


def test_adapter_beats_baseline_end_to_end(model_half, tiny):
    """model_half (conftest): eval, leaks and gate of the first run's adapter."""
    from stages import eval as E

    folder, paths = tiny
    run, e2e = model_half["run"], model_half["e2e"]
    res = EvalResults.model_validate_json((e2e / "data/eval/eval_results.json").read_text())
    assert res.n == 40
    assert res.finetuned.exact_match >= res.baseline.exact_match + 0.3, (res.baseline, res.finetuned)
    assert res.ci["exact_match"].low > 0 and res.mcnemar_exact_match.p_value < 0.05
    preds = (e2e / "data/eval/predictions.jsonl").read_text().splitlines()
    assert len(preds) == 80 and {json.loads(p)["model"] for p in preds} == {"baseline", "adapter"}
    first = (e2e / "data/eval/eval_results.json").read_bytes()
    E.main(["--params", str(folder / "params.yaml"), "--base", str(run / "data/base"), "--model-dir",
            str(run / "data/train"), "--val", str(paths["val"]), "--eval", str(paths["eval"]), "--out",
            str(e2e / "data/eval"), "--per-workflow-csv", str(e2e / "metrics/wf.csv"), "--rescore"])
    assert (e2e / "data/eval/eval_results.json").read_bytes() == first  # recomputable without a model
    decision = json.loads((e2e / "data/gate/gate_decision.json").read_text())
    assert decision["checks"]["exact_delta_ok"] is True
    assert decision["checks"]["leak_scan_ok"] is True, decision["check_details"]["leak_scan_ok"]
    assert decision["adapter_digest"] == res.adapter_digest


def _tiny_tokenizer(rows):
    from stages.basemodel import build_tokenizer, corpus_texts

    return build_tokenizer(corpus_texts(rows), 400, 128)


def _rows(tiny, split="train"):
    return T.load_rows([str(tiny[1][split])])


def test_zero_trainable_check_fires_without_generation_block(tiny):
    rows = _rows(tiny)[:8]
    tok = _tiny_tokenizer(rows)
    tok.chat_template = ("{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>' ~ m['content'] ~ '<|end|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    encoded, stats = T.encode_examples(tok, rows, 128, "drop", train_on_prompt=False)
    assert stats["zero_trainable"] == 8 and encoded == []
    with pytest.raises(T.TrainError, match=r"8 of 8 train examples have zero trainable tokens.*generation"):
        T.require_trainable(stats, "train", train_on_prompt=False)
    encoded, stats = T.encode_examples(tok, rows, 128, "drop", train_on_prompt=True)
    T.require_trainable(stats, "train", train_on_prompt=True)  # explicit opt-in: no error
    assert stats["kept"] == 8 and all(e["labels"] == e["input_ids"] for e in encoded)


def test_assistant_only_labels_and_length_policy(tiny):
    rows = _rows(tiny)[:8]
    tok = _tiny_tokenizer(rows)
    encoded, stats = T.encode_examples(tok, rows, 128, "drop", train_on_prompt=False)
    assert stats["kept"] == 8 and stats["zero_trainable"] == 0
    e = encoded[0]
    trained = tok.decode([t for t, lab in zip(e["input_ids"], e["labels"]) if lab != -100])
    assert trained == rows[0]["messages"][-1]["content"] + "<|end|>"  # the answer and the end-of-turn, only
    n_tokens = min(len(x["input_ids"]) for x in encoded)
    short = n_tokens - 2  # every example is longer than this
    _, dropped = T.encode_examples(tok, rows, short, "drop", False)
    assert dropped["dropped_too_long"] == 8 and dropped["kept"] == 0
    kept, cut = T.encode_examples(tok, rows, short, "truncate", False)
    assert cut["truncated"] == 8 and cut["truncated_to_empty"] + cut["kept"] == 8
    assert all(len(x["input_ids"]) == short for x in kept)
    _, cut = T.encode_examples(tok, rows, 16, "truncate", False)  # the prompt alone fills 16 tokens
    assert cut["truncated_to_empty"] == 8 and cut["kept"] == 0
    with pytest.raises(T.TrainError, match="length_policy=raise"):
        T.encode_examples(tok, rows, short, "raise", False)


def test_lora_trains_adapter_only(tiny):
    import torch

    from schemas.training import EmbeddedBaseParams
    from stages.basemodel import build_embedded_base

    rows = _rows(tiny)[:16]
    params = TrainParams.model_validate({"max_steps": 2, "batch_size": 8, "warmup_ratio": 0.0, "learning_rate": 0.01})
    model, tok = build_embedded_base(rows, EmbeddedBaseParams(vocab_size=400, pretrain_epochs=0), 0, 128,
                                     log=lambda _m: None)
    ds, _ = T.encode_examples(tok, rows, 128, "drop", False)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = T.build_trainer(params, model, tok, ds, [], tmp, cuda=False, bf16=False)
        named = dict(trainer.model.named_parameters())
        before = {k: v.detach().clone() for k, v in named.items()}
        assert all(("lora_" in k) == v.requires_grad for k, v in named.items())
        trainer.train()
    assert trainer.state.global_step == 2
    after = dict(trainer.model.named_parameters())
    base = [k for k in before if "lora_" not in k]
    lora = [k for k in before if "lora_" in k]
    assert base and lora
    assert [k for k in base if not torch.equal(before[k], after[k])] == []       # base weights unchanged
    assert [k for k in lora if torch.equal(before[k], after[k])] == []           # every adapter weight moved


def test_unknown_extra_training_args_key_is_an_error():
    with pytest.raises(T.TrainError, match="unknown field.*no_such_option"):
        T.check_extra_training_args({"max_grad_norm": 0.5, "no_such_option": 1})
    with pytest.raises(T.TrainError, match="learning_rate"):
        T.check_extra_training_args({"learning_rate": 1.0})
    T.check_extra_training_args({"max_grad_norm": 0.5, "optim": "adamw_torch"})
    params = TrainParams(extra_training_args={"max_grad_norm": 0.5})
    assert T.build_sft_kwargs(params, "out", cuda=False, bf16=False, has_val=True)["max_grad_norm"] == 0.5


def test_unknown_extra_key_fails_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  extra_training_args: {warmup_ratioo: 0.1}\n")
    with pytest.raises(T.TrainError, match="warmup_ratioo"):
        T.main(["--params", str(tmp_path / "params.yaml"), "--base", "missing", "--train", "missing.jsonl", "--val", "missing.jsonl",
                "--manifest", "missing.json", "--out", str(tmp_path / "out"), "--metrics", "m.json", "--loss-csv",
                "l.csv"])


def test_params_are_strict():
    with pytest.raises(ValueError, match="lerning_rate"):
        TrainParams.model_validate({"lerning_rate": 0.1})
    with pytest.raises(ValueError, match="num_workers"):
        TrainParams.model_validate({"dataloader_prefetch_factor": 2})


def test_quantization_resolution():
    assert T.resolve_quantization("auto", embedded=False, cuda=False, bnb=False) == "none"
    assert T.resolve_quantization("auto", embedded=False, cuda=True, bnb=True) == "4bit"
    assert T.resolve_quantization("auto", embedded=True, cuda=True, bnb=True) == "none"
    assert T.resolve_quantization("none", embedded=False, cuda=True, bnb=True) == "none"
    with pytest.raises(T.TrainError, match="CUDA"):
        T.resolve_quantization("4bit", embedded=False, cuda=False, bnb=True)
    with pytest.raises(T.TrainError, match="bitsandbytes"):
        T.resolve_quantization("4bit", embedded=False, cuda=True, bnb=False)


def test_shuffled_answers_keep_format_not_mapping():
    import random

    from stages.basemodel import shuffled_answers

    rows = [{"workflow": wf, "messages": [{"role": "system", "content": INTENT_SYS},
                                          {"role": "user", "content": f"q{i}"},
                                          {"role": "assistant", "content": f"{wf}-a{i}"}]}
            for i, wf in enumerate(["x"] * 5 + ["y"] * 3 + ["z"])]
    out = shuffled_answers(rows, random.Random(0))
    for before, after in zip(rows, out):
        assert after["messages"][:2] == before["messages"][:2]               # prompts untouched
        assert after["messages"][-1]["content"].startswith(before["workflow"])  # answers stay in their workflow
        if before["workflow"] != "z":                                        # z has one row: nothing to swap
            assert after["messages"][-1] != before["messages"][-1]
    for wf in "xyz":
        assert sorted(r["messages"][-1]["content"] for r in out if r["workflow"] == wf) == \
            sorted(r["messages"][-1]["content"] for r in rows if r["workflow"] == wf)
    assert rows[0]["messages"][-1]["content"] == "x-a0"                      # input not mutated


def test_loss_rows():
    history = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}, {"eval_loss": 1.7, "step": 2},
               {"train_runtime": 3.0, "train_loss": 1.75, "step": 2}]
    rows = T.loss_rows(history)
    assert rows == [{"step": 1, "loss": 2.0, "val_loss": ""}, {"step": 2, "loss": 1.5, "val_loss": 1.7}]
    assert T.loss_csv(rows) == "step,loss,val_loss\n1,2.0,\n2,1.5,1.7\n"


def test_bench_compares_batched_and_one_at_a_time_generation(two_runs, tiny):
    """bench.model's eval comparison on the tiny adapter: same prompts, same model, both ways."""
    from bench.model import eval_figures

    run, _ = two_runs
    _, paths = tiny
    res = eval_figures(run / "data/train", paths["val"], paths["eval"], 12)
    assert res["prompts"] == 12 and res["one_at_a_time"]["seconds"] > 0 and res["batched"]["seconds"] > 0
    assert res["speedup"] == round(res["one_at_a_time"]["seconds"] / res["batched"]["seconds"], 2)
    assert res["same_text_share"] >= 0.9  # left padding changes nothing greedy decoding would see
