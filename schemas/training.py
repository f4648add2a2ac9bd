"""Params of the model stages (base, train, eval, gate) and the files they hand on: data/base/model.json,
data/train/model.json, metrics/train.json, data/eval/predictions.jsonl, eval_results.json, gate_decision.json.

Params models are extra="forbid": a typo in params.yaml is an error, never a silently ignored key.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraParams(_Params):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="'all-linear' (every linear layer but the LM head) or module names"
    )


class EmbeddedBaseParams(_Params):
    """The tiny Llama built locally when base.source is 'embedded' (see stages/basemodel.py)."""

    vocab_size: int = Field(2048, ge=300, description="byte-level BPE vocabulary trained on the train split")
    hidden_size: int = Field(96, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    pretrain_epochs: int = Field(10, ge=0, description="epochs over train prompts paired with shuffled answers")
    pretrain_lr: float = Field(6e-3, gt=0)
    pretrain_batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> "EmbeddedBaseParams":
        if self.hidden_size % self.num_heads:
            raise ValueError("base.embedded.hidden_size must be a multiple of num_heads")
        return self


PRESETS = ("smollm2-135m-instruct",)


class BaseParams(_Params):
    """The base stage: which model data/base/ holds (see stages/base.py). The stage writes its bytes there, so
    dvc.lock pins the base by content, whatever the source."""

    source: str = Field(
        "embedded", description="'embedded' (a tiny Llama built from the train split), a preset "
        f"({', '.join(PRESETS)}), a local folder with safetensors, a .gguf file (llama family), or a hub id")
    revision: str | None = Field(None, description="hub commit of a hub-id source (required for one: pin it)")
    allow_download: bool = Field(False, description="false: a hub id is taken from the local HF cache only")
    seed: int = Field(42, description="embedded: initialisation and pre-training seed")
    max_length: int = Field(512, ge=8, description="embedded: its context length and pre-training cut")
    cpu_threads: int = Field(0, ge=0, description="torch threads on CPU (0: one per core); see train.cpu_threads")
    embedded: EmbeddedBaseParams = Field(default_factory=EmbeddedBaseParams)


class BaseManifest(BaseModel):
    """data/base/model.json: the base's identity, written by base, read by train and eval."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    name: str = Field(description="'embedded', the preset, a hub id, or the folder's/file's own name (no path)")
    kind: Literal["embedded", "preset", "folder", "gguf", "hub"]
    revision: str | None = Field(None, description="hub commit, or the package version of a preset")
    source_digest: str | None = Field(None, description="content id of the source file (gguf, preset)")
    weights_digest: str = Field(description="content id of the safetensors files, by name")
    files: dict[str, str] = Field(description="every file of data/base but this one: name -> content id")
    chat_template_digest: str | None
    has_generation_markers: bool
    parameters: int
    model_type: str


class TrainParams(_Params):
    chat_template: str = Field(
        "auto", description="'auto': the base's own template if it marks the assistant turn with {% generation %}, "
        "else trl's training version of it, else the built-in 'chatml-tools' for a ChatML tokenizer; 'model': the "
        "base's own template as it is; 'chatml-tools'; or a path to a .jinja file")
    unrendered_tool_calls: Literal["raise", "drop"] = Field(
        "raise", description="a row whose tool calls the chat template does not render in the <tool_call> format: "
        "fail (raise) or drop the row (counted in metrics/train.json)")
    quantization: Literal["auto", "4bit", "none"] = Field(
        "auto", description="auto: QLoRA 4-bit NF4 on CUDA with bitsandbytes, else full-precision LoRA"
    )
    seed: int = 42
    cpu_threads: int = Field(
        0, ge=0, description="torch threads on CPU (0: one per core, the default). Set 1 on a shared, busy CPU: "
        "extra threads spin there and a step got 3x slower; on an idle 2-core machine 2 threads are 1.7x faster. "
        "CPU results are byte-reproducible for a given thread count")
    learning_rate: float = Field(1e-2, gt=0)
    num_epochs: float = Field(16.0, gt=0)
    max_steps: int = Field(-1, description="> 0 overrides num_epochs")
    batch_size: int = Field(16, ge=1, description="per device")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8, description="tokens per example (chat template included)")
    length_policy: Literal["drop", "truncate", "raise"] = Field(
        "drop", description="examples longer than max_length: drop them, cut their end, or fail"
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    eval_steps: int = Field(20, ge=1, description="val loss every N optimizer steps")
    save_steps: int = Field(0, ge=0, description="0: no intermediate checkpoints (early stopping saves at eval_steps)")
    early_stopping_patience: int = Field(0, ge=0, description="0: off; else stop after N evals without a val-loss gain")
    logging_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    packing: bool = False
    train_on_prompt: bool = Field(False, description="true: loss on every token, not only the assistant's")
    train_files: list[str] = Field(default_factory=list, description="extra train shards (same row shape)")
    val_files: list[str] = Field(default_factory=list, description="extra val shards (same row shape)")
    dataset_num_proc: int | None = Field(None, ge=1)
    dataloader_num_workers: int = Field(0, ge=0, description="0 on CPU keeps runs byte-reproducible")
    dataloader_prefetch_factor: int | None = Field(None, ge=1)
    dataloader_persistent_workers: bool = False
    dataloader_pin_memory: bool = False
    lora: LoraParams = Field(default_factory=LoraParams)
    extra_training_args: dict[str, Any] = Field(
        default_factory=dict, description="more SFTConfig/TrainingArguments fields; an unknown name is an error"
    )

    @model_validator(mode="after")
    def _workers(self) -> "TrainParams":
        if self.dataloader_num_workers == 0 and (self.dataloader_prefetch_factor or self.dataloader_persistent_workers):
            raise ValueError("train.dataloader_prefetch_factor/persistent_workers need dataloader_num_workers > 0")
        return self


class EvalParams(_Params):
    include_val: bool = Field(True, description="score the val split as well as eval.jsonl")
    max_examples: int | None = Field(None, ge=1, description="cap on held-out rows (first N by id), for quick runs")
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    max_prompt_tokens: int = Field(1024, ge=8, description="longer prompts keep their last N tokens (counted)")
    lowercase: bool = True
    collapse_whitespace: bool = True
    strip_punctuation: bool = Field(True, description="punctuation counts as a space when comparing answers")
    stopwords: list[str] | None = Field(None, description="None: the built-in English list in stages/metrics.py")
    cpu_threads: int = Field(0, ge=0, description="torch threads on CPU (0: one per core); see train.cpu_threads")
    bootstrap_samples: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    seed: int = 0


class GateParams(_Params):
    """Every threshold is inclusive: a value exactly at the threshold passes (see stages/gate.py)."""

    min_delta_exact_match: float = 0.05
    min_delta_keyword_recall: float = 0.05
    require_ci_lower_bound: bool = Field(True, description="the CI's lower bound, not only the mean, must clear it")
    max_workflow_regression: float = Field(
        0.05, ge=0, description="largest allowed exact-match drop (baseline - adapter) in any workflow"
    )
    min_workflow_examples: int = Field(5, ge=1, description="workflows with fewer cases are reported, not gated")
    min_delta_tool_call_accuracy: float = Field(
        0.0, ge=-1, le=1, description="smallest allowed tool-call accuracy delta (adapter - baseline), overall and in "
        "every workflow with at least min_workflow_examples tool-call cases; 0 = no regression allowed")
    min_eval_examples: int = Field(50, ge=0)
    require_min_example_ok: bool = True
    require_redaction_ok: bool = True
    require_leak_scan_ok: bool = Field(
        True, description="no detector or canary hit in any artifact (data/leaks/leak_report.json) or in the gate's own report"
    )


# ---- outputs ----------------------------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Interval(_Out):
    low: float
    high: float


class ModelScores(_Out):
    """Means over the cases where each metric is defined (counts in EvalResults.counts)."""

    exact_match: float
    keyword_recall: float | None = None
    token_f1: float
    json_valid: float | None = None
    json_field_accuracy: float | None = None
    forbidden_violation_rate: float | None = None
    # only over cases whose reference makes tool calls (None when there are none); see stages/metrics.py
    tool_call_accuracy: float | None = None
    tool_name_accuracy: float | None = None
    tool_args_f1: float | None = None
    tool_call_parse_rate: float | None = None


class McNemar(_Out):
    baseline_only: int = Field(description="cases the baseline got right and the adapter wrong")
    adapter_only: int = Field(description="cases the adapter got right and the baseline wrong")
    p_value: float


class Comparison(_Out):
    n: int
    counts: dict[str, int] = Field(description="cases each metric is defined on")
    baseline: ModelScores
    finetuned: ModelScores
    delta: dict[str, float] = Field(description="finetuned - baseline, per metric")
    ci: dict[str, Interval] = Field(description="paired-bootstrap CI of each delta")
    mcnemar_exact_match: McNemar


class BaseModelIdentity(_Out):
    name: str = Field(description="'embedded', a hub id or a folder name")
    revision: str | None = None
    weights_digest: str | None = Field(None, description="content id of the base weights, when known locally")


class ChatTemplateRef(_Out):
    name: str = Field(description="train.chat_template as resolved: 'model', 'chatml-tools', trl's, or a file name")
    digest: str = Field(description="content id of the template's text")


class AdapterManifest(_Out):
    """data/train/model.json: what train fitted, for eval (which base to load, and a check that it is the same
    weights) and for eval_results.json (the identities it carries on to gate)."""

    base_model: BaseModelIdentity
    base_kind: Literal["embedded", "preset", "folder", "gguf", "hub"]
    adapter_dir: str = Field(description="the adapter's folder, relative to model.json's")
    chat_template: ChatTemplateRef
    adapter_digest: str = Field(description="content id of the adapter's weights and config")
    dataset_digest: str | None = Field(description="the manifest's digest of the dataset it was trained on")
    quantization: Literal["4bit", "none"]
    max_length: int


class TrainMetrics(_Out):
    """metrics/train.json (`dvc metrics diff`): counts of what was trained on, the losses, the identities.
    Deterministic: no timings (those go to --timing)."""

    base_model: str
    base_kind: Literal["embedded", "preset", "folder", "gguf", "hub"]
    chat_template: str
    chat_template_digest: str
    template_rows_compared: int | None = Field(None, description="only with the built-in template: rows where it "
                                               "was checked against the base's own")
    unrendered_tool_call_rows_dropped: int
    device: Literal["cuda", "cpu"]
    precision: Literal["fp32", "bf16", "fp16"]
    quantization: Literal["4bit", "none"]
    train_examples: int
    val_examples: int
    dropped_too_long: int
    truncated: int
    truncated_to_empty: int
    zero_trainable: int
    train_tokens: int
    train_trainable_tokens: int
    steps: int
    epochs: float
    train_loss: float
    final_step_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    base_val_loss: float | None = Field(description="the base's val loss before any update (step 0)")
    trainable_params: int
    base_params: int
    dataset_digest: str | None
    adapter_digest: str


class Prediction(_Out):
    """data/eval/predictions.jsonl: one model's answer to one held-out case; `eval --rescore` recomputes
    eval_results.json from these rows alone."""

    key: str = Field(description="<split>:<eval case id or row id>, unique")
    id: str
    split: Literal["val", "eval"]
    workflow: str
    model: Literal["baseline", "adapter"]
    prompt_digest: str
    prediction: str
    reference: str
    expected_behavior: list[str]
    forbidden_behavior: list[str]


class EvalResults(_Out):
    schema_version: Literal[1] = 1
    n: int
    baseline: ModelScores
    finetuned: ModelScores
    delta: dict[str, float]
    counts: dict[str, int]
    ci: dict[str, Interval]
    mcnemar_exact_match: McNemar
    per_workflow: dict[str, Comparison]
    base_model: BaseModelIdentity
    adapter_digest: str
    dataset_digest: str | None
    predictions_digest: str
    truncated_prompts: int
    params: EvalParams


class CheckDetail(_Out):
    value: bool | int | float | str | None
    threshold: bool | int | float | str | None
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    passed: bool = Field(alias="pass")
    reason: str


class GateDecision(_Out):
    # openclaw-ft's fields, all of them
    timestamp_utc: str = Field(description="a deterministic run label (from the dataset digest), not a wall clock")
    run_dir: str
    dataset_manifest: str
    eval_result: str
    thresholds: dict[str, float | int | bool]
    checks: dict[str, bool]
    is_real_improvement: bool
    promote: bool
    # ours
    check_details: dict[str, CheckDetail]
    input_digests: dict[str, str]
    base_model: BaseModelIdentity
    adapter_digest: str
    reasons: list[str] = Field(description="one line per failed check; empty when promoted")
