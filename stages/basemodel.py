"""The embedded default base model: a tiny Llama and its tokenizer, built locally with no download.

It exists so that the whole flywheel runs end to end on a laptop CPU in minutes, and it is an *honest* baseline:

- the byte-level BPE tokenizer is trained on the train split's text only (never val or eval);
- the model is pre-trained on the train split's conversations with each final answer swapped for another answer of
  the same workflow, reshuffled every epoch; earlier assistant turns (tool calls, whose arguments often carry the
  labels) stay in context but out of the loss. It learns the language of the prompts and the format of the answers
  (which labels, which JSON keys, how a refusal reads) but never which answer goes with which prompt. It scores at
  chance on held-out cases; the LoRA adapter has to learn the mapping itself.

It is not a language model you would deploy: about 0.4M parameters with the default params (2 layers, hidden 96,
a 2,048-token vocabulary fitted to one dataset) and no knowledge beyond its train split. Point base.source at
a real model (a preset, a GGUF file, a local folder or a hub id: stages/base.py) for real use.

Also here, shared by base, train and eval: file digests, the check of data/base against its model.json, and the
CPU math settings that make their results independent of the thread count.
"""
from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from schemas.training import BaseManifest, EmbeddedBaseParams
from stages.chat import render_tool_call
from stages.core import content_id, read_model


def pin_cpu_math() -> None:
    """Make MKL's float results independent of how many threads it runs. Call before torch is first imported.

    Why: torch's CPU wheel does its matmuls in MKL, which splits a long reduction (a LoRA weight gradient sums over
    batch x sequence) by thread count, so 1 and 2 threads give different bits, and with MKL_DYNAMIC (on by default)
    MKL may change the count at run time. Conditional numerical reproducibility in STRICT mode fixes the order
    whatever the count; on the 2-core machine it cost no measurable time (tests/test_train.py checks the bits).
    Results still depend on the instruction set MKL picks (AVX2 vs AVX-512). A user's own MKL_* settings win.
    """
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")


SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
PAD, EOS = "<|pad|>", "<|end|>"

# The end-of-turn token sits inside {% generation %}: assistant-only loss then trains the model to stop.
# Tool calls render in stages.chat's Hermes format (arguments parsed by train first), so a decoded prediction
# compares with stages.chat.reference_text() and parses with stages.chat.parse_tool_calls().
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('unsupported role: ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>' }}{% generation %}"
    "{{ message['content'] if message['content'] is string else '' }}"
    "{%- for call in message.get('tool_calls', []) -%}"
    "{%- if not loop.first or (message['content'] is string and message['content']) -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_call>\\n{\"name\": ' ~ (call['function']['name'] | tojson) ~ ', \"arguments\": ' }}"
    "{{ call['function']['arguments'] | tojson }}{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|end|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ '<|' ~ message['role'] ~ '|>' ~ (message['content'] if message['content'] is string else '') ~ '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


def file_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes, read in chunks (base weights are hundreds of MB)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_base(base_dir: Path) -> BaseManifest:
    """The base stage's model.json, after checking every file it lists against its bytes (train and eval call
    this: a base edited outside DVC is an error, not a silently different baseline)."""
    base_dir = Path(base_dir)
    man = read_model(base_dir / "model.json", BaseManifest)
    for name, digest in sorted(man.files.items()):
        path = base_dir / name
        if not path.is_file() or file_digest(path) != digest:
            raise SystemExit(f"{base_dir.name}/{name}: missing or changed since the base stage wrote it; "
                             "rerun it (dvc repro base)")
    weights = {k: v for k, v in man.files.items() if k.endswith(".safetensors")}
    if content_id(weights) != man.weights_digest:
        raise SystemExit(f"{base_dir.name}/model.json: weights_digest does not match its files; rerun the base stage")
    return man


def corpus_texts(rows: Sequence[dict]) -> list[str]:
    """Every message text of the rows, in row order: the tokenizer's training corpus."""
    out: list[str] = []
    for row in rows:
        for m in row["messages"]:
            if isinstance(m.get("content"), str) and m["content"]:
                out.append(m["content"])
            for call in m.get("tool_calls") or []:
                fn = call.get("function", {})
                out.append(render_tool_call(str(fn.get("name", "")), fn.get("arguments", {})))
    return out


def build_tokenizer(texts: Sequence[str], vocab_size: int, model_max_length: int):
    """A byte-level BPE tokenizer trained on `texts` (deterministic for a given corpus and vocab size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=model_max_length,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, EOS)],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "right"
    return hf


def answer_donors(workflows: Sequence[str], rng: random.Random) -> list[int]:
    """For each row, the row whose answer it gets: a random cycle within each workflow, so that no row keeps its
    own answer (a workflow of one row keeps it: there is nothing to swap). A row may still get an *equal* answer by
    chance, which is what chance level means."""
    by_wf: dict[str, list[int]] = defaultdict(list)
    for i, wf in enumerate(workflows):
        by_wf[str(wf)].append(i)
    donors = list(range(len(workflows)))
    for wf in sorted(by_wf):
        order = by_wf[wf][:]
        rng.shuffle(order)
        for k, i in enumerate(order):
            donors[i] = order[(k + 1) % len(order)]
    return donors


def shuffled_answers(rows: Sequence[dict], rng: random.Random) -> list[dict]:
    """Copies of the rows whose final answers are permuted within each workflow (see answer_donors)."""
    donors = answer_donors([r.get("workflow", "") for r in rows], rng)
    out = []
    for row, d in zip(rows, donors):
        out.append({**row, "messages": [*row["messages"][:-1], rows[d]["messages"][-1]]})
    return out


def _split_encode(tokenizer, rows: Sequence[dict]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(prompt ids up to the final assistant header, prompt loss mask, final answer ids) per row.

    The role tokens are special, so tokenization never merges across them: prompt[i] + answer[j] is exactly the
    encoding of prompt i answered with answer j. The mask leaves out earlier assistant turns (tool calls): they
    stay in context but are not trained on, since their arguments often carry the very labels of the answer.
    """
    prompts, masks, answers = [], [], []
    for row in rows:
        full = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        head = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=True, return_dict=True,
                                             add_generation_prompt=True, return_assistant_tokens_mask=True)
        ids = list(head["input_ids"])
        if list(full[: len(ids)]) != ids:
            raise RuntimeError("embedded chat template: the prompt is not a prefix of the conversation")
        prompts.append(ids)
        masks.append([0 if a else 1 for a in head["assistant_masks"]])
        answers.append(list(full[len(ids):]))
    return prompts, masks, answers


def build_embedded_base(train_rows: Sequence[dict], cfg: EmbeddedBaseParams, seed: int, max_length: int,
                        log: Any = print):
    """Build tokenizer + tiny Llama from the train split only, pre-trained on shuffled answers. CPU, fp32, seeded."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(corpus_texts(train_rows), cfg.vocab_size, max_length)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(max_length, 64),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    n_params = sum(p.numel() for p in model.parameters())
    rng = random.Random(seed)
    if cfg.pretrain_epochs and train_rows:
        _pretrain(model, tokenizer, train_rows, cfg, rng, max_length, seed)
    model.eval()
    log(f"embedded base: tiny Llama, {n_params} parameters, vocab {len(tokenizer)}, "
        f"pre-trained {cfg.pretrain_epochs} epochs on {len(train_rows)} train rows with shuffled answers (CPU, fp32)")
    return model, tokenizer


def _length_grouped_batches(lengths: Sequence[int], bs: int, gen) -> list[list[int]]:
    """Random batches of similar length (less padding), in random order: shuffle, sort within groups of 8 batches."""
    import torch

    order = torch.randperm(len(lengths), generator=gen).tolist()
    mega = bs * 8
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [group[k:k + bs] for k in range(0, len(group), bs)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _pretrain(model, tokenizer, rows, cfg: EmbeddedBaseParams, rng: random.Random, max_length: int, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    bs = cfg.pretrain_batch_size
    steps_per_epoch = math.ceil(len(rows) / bs)
    total = steps_per_epoch * cfg.pretrain_epochs
    warmup = max(1, total // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    pad = tokenizer.pad_token_id
    prompts, masks, answers = _split_encode(tokenizer, rows)
    workflows = [r.get("workflow", "") for r in rows]
    model.train()
    for _epoch in range(cfg.pretrain_epochs):  # a fresh permutation every epoch: no pairing can be memorised
        donors = answer_donors(workflows, rng)
        seqs = [(prompts[i] + answers[d])[:max_length] for i, d in enumerate(donors)]
        keep = [(masks[i] + [1] * len(answers[d]))[:max_length] for i, d in enumerate(donors)]
        for batch_idx in _length_grouped_batches([len(s) for s in seqs], bs, gen):
            width = max(len(seqs[i]) for i in batch_idx)
            ids = torch.full((len(batch_idx), width), pad, dtype=torch.long)
            labels = torch.full((len(batch_idx), width), -100, dtype=torch.long)
            att = torch.zeros((len(batch_idx), width), dtype=torch.long)
            for j, i in enumerate(batch_idx):
                n = len(seqs[i])
                ids[j, :n] = torch.tensor(seqs[i])
                att[j, :n] = 1
                labels[j, :n] = torch.tensor([t if k else -100 for t, k in zip(seqs[i], keep[i])])
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    model.eval()
