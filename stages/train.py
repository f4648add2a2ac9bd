"""train: fit a LoRA adapter on the train split with trl's SFTTrainer (QLoRA 4-bit on CUDA, fp32 LoRA on CPU).

    python -m stages.train --params params.yaml --base data/base --train data/build_dataset/train.jsonl \
        --val data/build_dataset/val.jsonl --manifest data/build_dataset/dataset_manifest.json \
        --out data/train --metrics metrics/train.json --loss-csv metrics/train_loss.csv

Multi-GPU / multi-node: the same command under `accelerate launch -m stages.train ...`; only the main process
writes outputs.

Loss is on assistant tokens only. The examples are tokenized here, with the tokenizer's chat template and its
`{% generation %}` blocks (the same `return_assistant_tokens_mask` mechanism trl's `assistant_only_loss` uses), so
that every example can be counted: too long (length_policy), truncated, and with zero trainable tokens. The
pre-tokenized `input_ids`/`labels` go to SFTTrainer, which trains on them as they are. On CPU the loss projects
only the labelled positions through the LM head (see _label_positions_trainer: 2.5x faster per step there).

Determinism: on CPU, seeded with torch deterministic algorithms and in-process data loading, two runs write
byte-identical files (tests/test_train.py checks it across two processes). On CUDA runs are seeded, not bit-exact.

The base comes from `--base` (the base stage's data/base: safetensors, tokenizer, model.json with its digests), so
dvc.lock pins it by content. The chat template is train.chat_template (stages/templates.py): the base's own when it
marks the assistant turn, trl's training version, or the built-in chatml-tools; a row whose tool calls it would not
render fails or is dropped and counted (train.unrendered_tool_calls).

Outputs (`--out`): adapter/ (weights, config, tokenizer with the chat template it was trained with, README.md model
card) and model.json (base identity and chat template, for eval and gate).
Everything written is deterministic: no clock, host or absolute path. Timings go only to the log and, when asked,
to `--timing` (keep that file out of DVC's outs: it changes on every run).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from schemas.records import DatasetManifest
from schemas.training import (AdapterManifest, BaseManifest, BaseModelIdentity, ChatTemplateRef, TrainMetrics,
                              TrainParams)
from stages import templates
from stages.basemodel import check_base, pin_cpu_math
from stages.chat import normalize_tool_calls, parse_tools
from stages.core import content_id, load_params, read_json, read_jsonl, read_model, write_json, write_text

ROLES = {"system", "user", "assistant", "tool"}

# SFTConfig fields driven by a named train.* param: setting them again in extra_training_args is an error.
MANAGED_ARGS = {
    "output_dir", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "max_length", "warmup_steps", "lr_scheduler_type",
    "weight_decay", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "load_best_model_at_end",
    "metric_for_best_model", "greater_is_better", "logging_strategy", "logging_steps", "seed", "data_seed", "eval_on_start",
    "dataset_num_proc", "dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_persistent_workers",
    "dataloader_pin_memory", "packing", "gradient_checkpointing", "activation_checkpointing", "assistant_only_loss",
    "completion_only_loss", "bf16", "fp16", "use_cpu", "trust_remote_code",
}


class TrainError(SystemExit):
    """A problem with the inputs or params that the user must fix; the message says how."""


def log(msg: str) -> None:
    if _is_main():
        print(f"[train] {msg}", file=sys.stderr, flush=True)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---- inputs ------------------------------------------------------------------------------------------------------


def load_rows(paths: Iterable[str]) -> list[dict]:
    """Read split rows; each must be a conversation ending on an assistant turn (the reference answer)."""
    rows: list[dict] = []
    for path in paths:
        for i, row in enumerate(read_jsonl(path), start=1):
            msgs = row.get("messages")
            where = f"{path}:{i} (id {row.get('id', '?')})"
            if not isinstance(msgs, list) or not msgs:
                raise TrainError(f"{where}: no messages")
            for m in msgs:
                if m.get("role") not in ROLES:
                    raise TrainError(f"{where}: unsupported role {m.get('role')!r}")
            if msgs[-1]["role"] != "assistant":
                raise TrainError(f"{where}: the last message must be the assistant's answer")
            rows.append({"id": str(row.get("id", f"{Path(path).name}:{i}")), "workflow": str(row.get("workflow", "")),
                         "messages": [_clean_message(m) for m in msgs], "tools": parse_tools(row.get("tools"))})
    return rows


def _clean_message(m: dict) -> dict:
    out = {"role": m["role"], "content": m.get("content") if isinstance(m.get("content"), str) else ""}
    if m.get("tool_calls"):
        # Parsed arguments: every template (the embedded one, the built-ins, Qwen's) renders `arguments | tojson`.
        out["tool_calls"] = normalize_tool_calls(m["tool_calls"])
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    if m.get("name"):
        out["name"] = m["name"]
    return out


# ---- params checks -----------------------------------------------------------------------------------------------


def sft_config_fields() -> set[str]:
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig) if f.init}


def check_extra_training_args(extra: dict[str, Any]) -> None:
    """Every key must be an SFTConfig/TrainingArguments field of the installed versions, and not a managed one."""
    import transformers
    import trl

    unknown = sorted(set(extra) - sft_config_fields())
    if unknown:
        raise TrainError(
            f"train.extra_training_args: unknown field(s) {', '.join(unknown)}: not accepted by trl {trl.__version__} "
            f"SFTConfig / transformers {transformers.__version__} TrainingArguments (nothing is dropped silently)"
        )
    managed = sorted(set(extra) & MANAGED_ARGS)
    if managed:
        raise TrainError(f"train.extra_training_args: {', '.join(managed)} set by named train.* params; set those instead")


def resolve_quantization(requested: str, embedded: bool, cuda: bool, bnb: bool) -> str:
    """'4bit' or 'none'. A forced 4bit that cannot be honoured is an error, never a silent fallback."""
    if requested == "4bit":
        if embedded:
            raise TrainError("train.quantization=4bit: the embedded base is a tiny fp32 model; use auto or none")
        if not cuda:
            raise TrainError("train.quantization=4bit needs a CUDA GPU (bitsandbytes NF4); none is available here")
        if not bnb:
            raise TrainError("train.quantization=4bit needs bitsandbytes: pip install bitsandbytes")
        return "4bit"
    if requested == "auto" and cuda and bnb and not embedded:
        return "4bit"
    return "none"


# ---- tokenization ------------------------------------------------------------------------------------------------


def encode_examples(tokenizer, rows: Sequence[dict], max_length: int, length_policy: str,
                    train_on_prompt: bool) -> tuple[list[dict], dict[str, int]]:
    """Tokenize with the chat template; labels are -100 outside the assistant's {% generation %} spans.

    Returns the kept examples and counts: zero_trainable (no assistant token before any truncation: a template
    problem), dropped_too_long, truncated, truncated_to_empty (truncation cut every assistant token: dropped).
    """
    stats = {"examples": len(rows), "kept": 0, "zero_trainable": 0, "dropped_too_long": 0, "truncated": 0,
             "truncated_to_empty": 0, "tokens": 0, "trainable_tokens": 0}
    out = []
    for row in rows:
        enc = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        mask = list(enc["assistant_masks"])
        if not any(mask):
            stats["zero_trainable"] += 1
        labels = list(ids) if train_on_prompt else [t if m else -100 for t, m in zip(ids, mask)]
        if len(ids) > max_length:
            if length_policy == "raise":
                raise TrainError(f"example {row['id']}: {len(ids)} tokens > train.max_length={max_length} "
                                 "(train.length_policy=raise; use drop or truncate, or raise max_length)")
            if length_policy == "drop":
                stats["dropped_too_long"] += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            stats["truncated"] += 1
            if all(t == -100 for t in labels):
                stats["truncated_to_empty"] += 1
                continue
        if all(t == -100 for t in labels):
            continue  # zero_trainable, counted above; require_trainable() decides whether that is fatal
        out.append({"input_ids": ids, "labels": labels})
        stats["kept"] += 1
        stats["tokens"] += len(ids)
        stats["trainable_tokens"] += sum(t != -100 for t in labels)
    return out, stats


def require_trainable(stats: dict[str, int], split: str, train_on_prompt: bool) -> None:
    if stats["zero_trainable"] and not train_on_prompt:
        raise TrainError(
            f"{stats['zero_trainable']} of {stats['examples']} {split} examples have zero trainable tokens: the "
            "loss is on assistant tokens only, and the chat template marked none. The likely cause is a chat "
            "template without a {% generation %}...{% endgeneration %} block around the assistant turn (trl ships "
            "patched training templates only for some model families). Add the block to the template, or set "
            "train.train_on_prompt: true to train on the whole sequence instead."
        )
    if stats["kept"] == 0:
        raise TrainError(f"no usable {split} examples left (counts: {stats}); check max_length and length_policy")


# ---- model loading -----------------------------------------------------------------------------------------------


def load_base(base_dir: Path, quant: str, cuda: bool, bf16: bool, gradient_checkpointing: bool):
    """(model, tokenizer, BaseManifest) from the base stage's folder: safetensors only, no repo code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        man = check_base(base_dir)
    except SystemExit as exc:
        raise TrainError(str(exc)) from exc
    common = {"local_files_only": True, "trust_remote_code": False}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir), **common)
        kwargs: dict[str, Any] = {**common, "use_safetensors": True,
                                  "dtype": (torch.bfloat16 if bf16 else torch.float16) if cuda else torch.float32}
        if quant == "4bit":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16,
            )
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    except OSError as exc:
        raise TrainError(f"cannot load the base model in {base_dir.name}/ ({man.name}): {exc}; rerun the base "
                         "stage (dvc repro base)") from exc
    if quant == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, man


def apply_template(tokenizer, params: TrainParams, train_rows: list[dict], val_rows: list[dict]):
    """Resolve train.chat_template onto the tokenizer; check it against the model's own template and for dropped
    tool calls. Returns (train rows, val rows, counts and template identity for metrics)."""
    own = tokenizer.chat_template
    try:
        template, name = templates.resolve(tokenizer, params.chat_template)
        info: dict[str, Any] = {"chat_template": name, "chat_template_digest": content_id(template)}
        if own and name == "chatml-tools":  # the built-in claims the model's own bytes where those are defined
            info.update(templates.compare_with_own(tokenizer, template, own, [*train_rows, *val_rows]))
        tokenizer.chat_template = template
        train_rows, dropped_train = templates.filter_tool_calls(tokenizer, template, train_rows,
                                                                params.unrendered_tool_calls, "train")
        val_rows, dropped_val = templates.filter_tool_calls(tokenizer, template, val_rows,
                                                            params.unrendered_tool_calls, "val")
    except templates.TemplateError as exc:
        raise TrainError(str(exc)) from exc
    info["unrendered_tool_call_rows_dropped"] = dropped_train + dropped_val
    log(f"chat template: {name}" + (f", same bytes as the model's own on {info['template_rows_compared']} rows "
                                     "without tools" if "template_rows_compared" in info else "")
        + (f"; dropped {dropped_train + dropped_val} rows whose tool calls it does not render "
           "(train.unrendered_tool_calls: drop)" if dropped_train + dropped_val else ""))
    return train_rows, val_rows, info


# ---- trainer config ----------------------------------------------------------------------------------------------


def build_sft_kwargs(params: TrainParams, output_dir: str, cuda: bool, bf16: bool, has_val: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {
        # ours, overridable through extra_training_args
        "report_to": "none",
        "save_only_model": True,
        "save_total_limit": 2,
        "full_determinism": not cuda,  # CPU: byte-reproducible; CUDA: seeded, not bit-exact (faster kernels)
        "logging_first_step": True,
        "train_sampling_strategy": "group_by_length",  # batches of similar length: less padding to compute
        "disable_tqdm": not _is_main(),
        # managed by named params
        "output_dir": output_dir,
        "learning_rate": params.learning_rate,
        "num_train_epochs": params.num_epochs,
        "max_steps": params.max_steps if params.max_steps > 0 else -1,
        "per_device_train_batch_size": params.batch_size,
        "per_device_eval_batch_size": params.batch_size,
        "gradient_accumulation_steps": params.grad_accum,
        "max_length": params.max_length,
        "warmup_steps": params.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        "lr_scheduler_type": params.lr_scheduler,
        "weight_decay": params.weight_decay,
        "logging_strategy": "steps",
        "logging_steps": params.logging_steps,
        "eval_strategy": "steps" if has_val else "no",
        "eval_steps": params.eval_steps,
        "eval_on_start": has_val,  # step 0: the base model's val loss, the reference the curve should fall from
        "save_strategy": "no",
        "seed": params.seed,
        "data_seed": params.seed,
        "dataset_num_proc": params.dataset_num_proc,
        "dataloader_num_workers": params.dataloader_num_workers,
        "dataloader_prefetch_factor": params.dataloader_prefetch_factor,
        "dataloader_persistent_workers": params.dataloader_persistent_workers,
        "dataloader_pin_memory": params.dataloader_pin_memory,
        "packing": params.packing,
        # transformers >= 5.x renamed it; the old name still works but warns
        ("activation_checkpointing" if "activation_checkpointing" in sft_config_fields() else
         "gradient_checkpointing"): params.gradient_checkpointing,
        "assistant_only_loss": False,  # the labels are already masked in encode_examples()
        "completion_only_loss": False,
        "bf16": bool(cuda and bf16),
        "fp16": bool(cuda and not bf16),
        "use_cpu": not cuda,
        "trust_remote_code": False,
    }
    if params.early_stopping_patience:
        if not has_val:
            raise TrainError("train.early_stopping_patience needs a val split")
        if params.save_steps and params.save_steps % params.eval_steps:
            raise TrainError("train.save_steps must be a multiple of train.eval_steps with early stopping")
        kw.update(save_strategy="steps", save_steps=params.save_steps or params.eval_steps,
                  load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    elif params.save_steps:
        kw.update(save_strategy="steps", save_steps=params.save_steps)
    kw.update(params.extra_training_args)
    return kw


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _label_positions_trainer(base_cls):
    """SFTTrainer whose loss projects only the positions that have a label through the LM head (CPU only).

    trl's fused LM head scores every position on devices without Triton, through a [tokens x 32768] buffer per
    step: on this project's 2-core CPU that made a LoRA step 2.5x slower than plain cross-entropy on the ~10% of
    positions that carry an (assistant) label. Same loss, same normalisation (num_items_in_batch), same logged
    metrics; CUDA keeps trl's own path.
    """
    import torch
    import torch.nn.functional as F

    class LabelPositionsSFTTrainer(base_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            labels = inputs["labels"]
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100  # position p predicts token p + 1
            targets = labels[:, 1:][labels[:, 1:] != -100]
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            outputs = model(**model_inputs, logits_to_keep=keep, use_cache=False)
            logits = outputs.logits.float().reshape(-1, outputs.logits.shape[-1])
            loss_sum = F.cross_entropy(logits, targets, reduction="sum")
            n_valid = targets.numel()
            denom = num_items_in_batch if num_items_in_batch is not None else n_valid
            loss = loss_sum / torch.as_tensor(denom, device=loss_sum.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            with torch.no_grad():
                correct = (logits.argmax(-1) == targets).sum()
                self._metrics[mode]["mean_token_accuracy"].append(correct.item() / max(n_valid, 1))
                if mode == "train":
                    self._total_train_tokens += int(inputs["attention_mask"].sum().item()) \
                        if "attention_mask" in inputs else int(inputs["input_ids"].numel())
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return LabelPositionsSFTTrainer


def build_trainer(params: TrainParams, model, tokenizer, train_ds: list[dict], val_ds: list[dict], output_dir: str,
                  cuda: bool, bf16: bool):
    """SFTTrainer over pre-tokenized examples, with a LoRA adapter on `model` (whose own weights stay frozen)."""
    import datasets
    from peft import LoraConfig
    from transformers import ProgressCallback
    from transformers.trainer_callback import EarlyStoppingCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**build_sft_kwargs(params, output_dir, cuda, bf16, bool(val_ds)))
    peft_config = LoraConfig(
        r=params.lora.r, lora_alpha=params.lora.alpha, lora_dropout=params.lora.dropout,
        target_modules=params.lora.target_modules, bias="none", task_type="CAUSAL_LM",
    )

    class EvalLine(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            last = next((e["loss"] for e in reversed(state.log_history) if "loss" in e), float("nan"))
            log(f"step {state.global_step}/{state.max_steps}: loss {last:.4f}, val_loss {metrics['eval_loss']:.4f}")

    class QuietProgress(ProgressCallback):
        """The progress bar without its per-step dict dumps (the loss CSV has them)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            return

    callbacks: list = [EvalLine()]
    if params.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=params.early_stopping_patience))
    trainer_cls = _label_positions_trainer(SFTTrainer) if not cuda and _accepts_logits_to_keep(model) else SFTTrainer
    trainer = trainer_cls(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(train_ds),
        eval_dataset=datasets.Dataset.from_list(val_ds) if val_ds else None,
        processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
    )
    trainer.remove_callback(ProgressCallback)
    if _is_main():
        trainer.add_callback(QuietProgress())
    return trainer


# ---- outputs -----------------------------------------------------------------------------------------------------


def loss_rows(log_history: Sequence[dict]) -> list[dict]:
    """One row per logged step: train loss and, at eval steps, val loss (blank elsewhere)."""
    by_step: dict[int, dict] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        if "loss" in entry:
            by_step.setdefault(step, {})["loss"] = round(float(entry["loss"]), 6)
        if "eval_loss" in entry:
            by_step.setdefault(step, {})["val_loss"] = round(float(entry["eval_loss"]), 6)
    return [{"step": s, "loss": v.get("loss", ""), "val_loss": v.get("val_loss", "")} for s, v in sorted(by_step.items())]


def loss_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    buf.write("step,loss,val_loss\n")
    for r in rows:
        buf.write(f"{r['step']},{r['loss']},{r['val_loss']}\n")
    return buf.getvalue()


def model_card(identity: dict, dataset_digest: str | None, params: TrainParams, metrics: dict) -> str:
    base = identity["name"]
    if base == "embedded":
        base_line = ("embedded: a tiny Llama built locally from this dataset's train split (stages/basemodel.py), "
                     "in the base stage's folder (data/base)")
    else:
        base_line = f"{base}" + (f" @ {identity['revision']}" if identity.get("revision") else "") + \
            " (its weights as the base stage wrote them: data/base)"
    lines = [
        "# agent-flywheel LoRA adapter",
        "",
        f"- Base model: {base_line}",
        f"- Base weights digest: {identity.get('weights_digest') or 'n/a'}",
        f"- Dataset digest: {dataset_digest or 'n/a'}",
        f"- Examples: {metrics['train_examples']} train, {metrics['val_examples']} val; "
        f"{metrics['steps']} optimizer steps",
        f"- Loss: {'whole sequence (train_on_prompt)' if params.train_on_prompt else 'assistant tokens only'}; "
        f"final train loss {metrics['train_loss']}, val loss {metrics['val_loss']}",
        f"- Quantization: {metrics['quantization']} ({metrics['precision']} on {metrics['device']})",
        f"- Chat template: {metrics['chat_template']} ({metrics['chat_template_digest']}), saved with this "
        "adapter's tokenizer; tool calls as `<tool_call>` JSON (stages/chat.py)",
        "",
        "Promote it only if the gate stage says so (data/gate/gate.md).",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, 'data/train/adapter')",
        "```",
        "",
        "## Train params",
        "",
        "```yaml",
        yaml.safe_dump(params.model_dump(mode="json"), sort_keys=True).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _replace_dir(staging: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


# ---- the stage: setup, load base, encode, fit, write (as trl's scripts/sft.py main() reads) -----------------------


@dataclasses.dataclass(frozen=True)
class Device:
    """Where and how the LoRA is fitted, decided once from the machine and train.quantization."""

    cuda: bool
    bf16: bool
    quant: str
    precision: str
    embedded: bool


def setup(params: TrainParams, base_dir: Path) -> Device:
    """Check params, quiet the libraries, pick device and quantization, make CPU runs deterministic."""
    check_extra_training_args(params.extra_training_args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the base is a local folder (the base stage's)
    embedded = read_model(base_dir / "model.json", BaseManifest).kind == "embedded"
    pin_cpu_math()
    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    # peft/trl still call the deprecated model.is_gradient_checkpointing; nothing for the user to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    cuda = torch.cuda.is_available()
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    try:
        import bitsandbytes  # noqa: F401  (lazily: CPU installs do not have it)

        bnb = True
    except Exception:
        bnb = False
    dev = Device(cuda, bf16, resolve_quantization(params.quantization, embedded, cuda, bnb),
                 "fp32" if not cuda else ("bf16" if bf16 else "fp16"), embedded)
    if not cuda:
        if params.cpu_threads:
            torch.set_num_threads(params.cpu_threads)
        torch.use_deterministic_algorithms(True)
        # Deterministic mode also NaN-fills every torch.empty (a debugging aid): with trl's chunked LM-head buffers
        # that alone made a CPU step ~8x slower. Results stay deterministic without it.
        torch.utils.deterministic.fill_uninitialized_memory = False
        log(f"no CUDA GPU: plain LoRA in fp32 on the CPU, {torch.get_num_threads()} thread(s) (no 4-bit "
            "quantization; slow for anything but small models)")
    elif dev.quant == "4bit":
        log(f"CUDA: QLoRA, base in 4-bit NF4 (bitsandbytes), {dev.precision} compute")
    else:
        log(f"CUDA: LoRA with {dev.precision} mixed precision, base not quantized"
            + ("" if bnb or embedded else " (bitsandbytes is not installed)"))
    return dev


def load(base_dir: Path, params: TrainParams, dev: Device):
    """(model, tokenizer, BaseManifest), with train.max_length checked against the base's context."""
    model, tokenizer, base = load_base(base_dir, dev.quant, dev.cuda, dev.bf16, params.gradient_checkpointing)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and params.max_length > context:
        raise TrainError(f"train.max_length={params.max_length} exceeds the base's context of {context} tokens"
                         + (" (base.max_length)" if dev.embedded else ""))
    return model, tokenizer, base


def encode(tokenizer, params: TrainParams, train_rows: list[dict], val_rows: list[dict]):
    """Template, then tokens: (train examples, val examples, counts for metrics). Every drop is counted."""
    train_rows, val_rows, info = apply_template(tokenizer, params, train_rows, val_rows)
    train_ds, train_stats = encode_examples(tokenizer, train_rows, params.max_length, params.length_policy,
                                            params.train_on_prompt)
    val_ds, val_stats = encode_examples(tokenizer, val_rows, params.max_length, params.length_policy,
                                        params.train_on_prompt)
    require_trainable(train_stats, "train", params.train_on_prompt)
    if val_rows:
        require_trainable(val_stats, "val", params.train_on_prompt)
    log(f"encoded: train {train_stats}, val {val_stats}")
    counts = {**info, "train_examples": train_stats["kept"], "val_examples": val_stats["kept"],
              **{k: train_stats[k] + val_stats[k] for k in ("dropped_too_long", "truncated", "truncated_to_empty",
                                                              "zero_trainable")},
              "train_tokens": train_stats["tokens"], "train_trainable_tokens": train_stats["trainable_tokens"]}
    return train_ds, val_ds, counts


@dataclasses.dataclass(frozen=True)
class Fit:
    trainer: Any
    training_loss: float
    val_loss: float | None
    train_seconds: float  # optimizer steps only
    val_seconds: float
    base_params: int
    trainable_params: int


def fit(params: TrainParams, dev: Device, model, tokenizer, train_ds: list[dict], val_ds: list[dict],
        staging: Path) -> Fit:
    """The LoRA on the base, its val loss at the end; the adapter saved to staging/adapter (every rank)."""
    from accelerate import PartialState

    if _is_main():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    PartialState().wait_for_everyone()
    total_params = sum(p.numel() for p in model.parameters())
    trainer = build_trainer(params, model, tokenizer, train_ds, val_ds, str(staging / "checkpoints"), dev.cuda,
                            dev.bf16)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    log(f"LoRA r={params.lora.r} alpha={params.lora.alpha} on {params.lora.target_modules}: "
        f"{trainable} trainable of {total_params} base parameters")
    val_seconds = _time_evaluations(trainer)
    tt = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - tt - val_seconds[0]  # optimizer steps only: val passes are timed apart
    val_loss = None
    if val_ds:
        # the loop's own val pass at the last step already measured the final weights: don't pay for it twice
        # (with early stopping the best weights are loaded back instead: evaluate those)
        last = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e
                and e.get("step") == trainer.state.global_step and not params.early_stopping_patience]
        val_loss = round(float(last[-1] if last else trainer.evaluate()["eval_loss"]), 6)
    trainer.save_model(str(staging / "adapter"))  # every rank: gathers sharded weights where needed
    return Fit(trainer, float(result.training_loss), val_loss, train_seconds, val_seconds[0], int(total_params),
               int(trainable))


def train_metrics(base: BaseManifest, dev: Device, counts: dict, f: Fit, history: list[dict],
                  dataset_digest: str | None) -> dict:
    """metrics/train.json's figures (schemas.training.TrainMetrics), but the adapter digest."""
    return {
        "base_model": base.name, "base_kind": base.kind, **counts,
        "device": "cuda" if dev.cuda else "cpu", "precision": dev.precision, "quantization": dev.quant,
        "steps": int(f.trainer.state.global_step),
        "epochs": round(float(f.trainer.state.epoch or 0.0), 4),
        "train_loss": round(f.training_loss, 6),
        "final_step_loss": next((r["loss"] for r in reversed(history) if r["loss"] != ""), None),
        "val_loss": f.val_loss,
        "best_val_loss": min((r["val_loss"] for r in history if r["val_loss"] != ""), default=None),
        "base_val_loss": next((r["val_loss"] for r in history if r["step"] == 0 and r["val_loss"] != ""), None),
        "trainable_params": f.trainable_params, "base_params": f.base_params, "dataset_digest": dataset_digest,
    }


def write_adapter(staging: Path, out: Path, params: TrainParams, base: BaseManifest, dev: Device,
                  metrics: dict) -> str:
    """The adapter folder (weights, deterministic config, model card) and model.json (AdapterManifest),
    swapped into `out` whole. Returns the adapter's digest."""
    identity = BaseModelIdentity(name=base.name, revision=base.revision, weights_digest=base.weights_digest)
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    (staging / "adapter" / "training_args.bin").unlink(missing_ok=True)
    _fix_adapter_config(staging / "adapter" / "adapter_config.json", base.name)
    write_text(staging / "adapter" / "README.md",
               model_card(identity.model_dump(), metrics["dataset_digest"], params, metrics))
    adapter_digest = content_id(
        {"weights": content_id((staging / "adapter" / "adapter_model.safetensors").read_bytes()),
         "config": content_id((staging / "adapter" / "adapter_config.json").read_bytes())})
    write_json(staging / "model.json", AdapterManifest(
        base_model=identity, base_kind=base.kind, adapter_dir="adapter",
        chat_template=ChatTemplateRef(name=metrics["chat_template"], digest=metrics["chat_template_digest"]),
        adapter_digest=adapter_digest, dataset_digest=metrics["dataset_digest"], quantization=dev.quant,
        max_length=params.max_length).model_dump(mode="json"))
    _replace_dir(staging, out)
    return adapter_digest


def run(params: TrainParams, base_dir: Path, train_paths: list[str], val_paths: list[str], manifest_path: str,
        out: Path, metrics_path: str, loss_csv_path: str, timing_path: str | None = None) -> dict:
    """The stage: setup, load base, encode, fit, write. Returns metrics/train.json's figures."""
    t0 = time.perf_counter()
    base_dir, out = Path(base_dir), Path(out)
    staging = out.with_name(f".{out.name}.staging")  # swapped in whole: a crash leaves the old adapter intact
    dev = setup(params, base_dir)
    dataset_digest = read_model(manifest_path, DatasetManifest).digest
    train_rows, val_rows = load_rows(train_paths), load_rows(val_paths)
    if not train_rows:
        raise TrainError("the train split is empty")
    model, tokenizer, base = load(base_dir, params, dev)
    train_ds, val_ds, counts = encode(tokenizer, params, train_rows, val_rows)
    f = fit(params, dev, model, tokenizer, train_ds, val_ds, staging)
    history = loss_rows(f.trainer.state.log_history)
    metrics = train_metrics(base, dev, counts, f, history, dataset_digest)
    if not _is_main():
        return metrics
    metrics["adapter_digest"] = write_adapter(staging, out, params, base, dev, metrics)
    write_json(metrics_path, TrainMetrics.model_validate(metrics).model_dump(mode="json", exclude_unset=True))
    write_text(loss_csv_path, loss_csv(history))
    timing = {"total_seconds": round(time.perf_counter() - t0, 2), "train_seconds": round(f.train_seconds, 2),
              "val_seconds": round(f.val_seconds, 2), "train_tokens_per_second":
              round(counts["train_tokens"] * max(metrics["epochs"], 1e-9) / f.train_seconds, 1)}
    log(f"timing (not in DVC metrics): {timing}")
    if timing_path:
        write_json(timing_path, timing)
    return metrics


def _time_evaluations(trainer) -> list[float]:
    """Time every val pass (trainer.evaluate, which the training loop calls too) into the returned cell, so that
    train tokens/s counts optimizer steps only."""
    import functools

    spent = [0.0]
    inner = trainer.evaluate

    @functools.wraps(inner)
    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    trainer.evaluate = timed
    return spent


def _fix_adapter_config(path: Path, base_model: str) -> None:
    """Deterministic adapter config: the base named as train.base_model says (never a loader's absolute path),
    target_modules sorted (peft writes a set, whose order changes with the process's hash seed)."""
    cfg = read_json(path)
    cfg["base_model_name_or_path"] = base_model
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    write_json(path, cfg)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__.split("\n")[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--base", required=True, help="the base stage's folder (model.json, safetensors, tokenizer)")
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--loss-csv", required=True)
    ap.add_argument("--timing", help="optional JSON of wall-clock timings (not deterministic: keep out of DVC outs)")
    a = ap.parse_args(argv)
    params = load_params(a.params, "train", TrainParams)
    m = run(params, Path(a.base), [a.train, *params.train_files], [a.val, *params.val_files], a.manifest, Path(a.out),
            a.metrics, a.loss_csv, a.timing)
    if _is_main():
        print(f"train: {m['base_model']} + LoRA on {m['train_examples']} examples, {m['steps']} steps "
              f"({m['device']}, {m['precision']}, quantization {m['quantization']}): train loss {m['train_loss']}, "
              f"val loss {m['val_loss']} -> {a.out}")


if __name__ == "__main__":
    main()
