"""Record models: raw inputs, the canonical Trace, and every artifact the data stages write."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant", "tool"]
Bucket = Literal["real", "synthetic", "adversarial"]
# Snapshot sub-folder (data/raw/<folder>/) -> mixing bucket. approved-runs and traces are both real work.
BUCKETS: dict[str, Bucket] = {"approved-runs": "real", "traces": "real", "synthetic": "synthetic",
                              "adversarial": "adversarial"}
ReviewStatus = Literal["accepted", "edited", "rejected", "unknown"]
Outcome = Literal["success", "failed", "unknown"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    # Inputs from other tools keep fields we don't know yet: they may matter to a later version.
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- inputs, accepted as they are
class HumanReview(_Open):
    status: str = "unknown"
    review_notes: str | None = None
    edit_distance_estimate: str | None = None


class ApprovedRun(_Open):
    """agentic-stack's approved-run shape (approved-run.schema.json); extra fields are kept."""

    id: str
    created_at: str
    domain: str
    workflow: str
    input_redacted: str
    output_approved: str
    human_review: HumanReview
    redaction_status: str
    pii_level: str
    project: str | None = None
    harness: str | None = None
    skill: str | None = None
    instruction: str | None = None
    input_summary: str | None = None
    output_summary: str | None = None
    raw_input_stored: bool | None = None
    trainable: bool | None = None


# ---------------------------------------------------------------- the canonical trace
class ToolFunction(_Strict):
    name: str
    arguments: str  # always a JSON text after normalisation (one level of encoding)


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolFunction


class Message(_Strict):
    role: Role
    content: str = ""
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class Review(_Strict):
    status: ReviewStatus
    notes: str | None = None
    edit_distance_estimate: str | None = None


class Trace(_Strict):
    """Every accepted raw shape is normalised into this one, then redacted."""

    id: str = Field(description="keyed hash of the source id (or of the content when there is none)")
    source_run_id_hash: str | None = None
    source_file: str = Field(description="path relative to the snapshot root")
    source_line: int
    format: Literal["approved_run", "openai", "openclaw_messages", "openclaw_conversation", "openclaw_pair", "sharegpt",
                    "anthropic", "responses", "hermes", "claude_code", "codex"]
    bucket: Bucket
    source: str = "unknown"
    created_at: str | None = None
    project: str = "unknown"
    domain: str = "unknown"
    workflow: str = "unknown"
    task_category: str = "unknown"
    outcome: Outcome = "unknown"
    review: Review
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    trainable: bool
    ineligible: list[str] = Field(default_factory=list, description="why it may not train, when it may not")
    redactions: dict[str, int] = Field(default_factory=dict, description="detector -> replacements")
    extra: dict[str, Any] = Field(default_factory=dict, description="other source fields, redacted")
    omitted: dict[str, int] = Field(default_factory=dict, description=(
        "content kept out of the messages by policy, by kind (thinking, image, tool_error, sidechain_events, "
        "off_thread_message, item_<type>); the content itself is under extra (inline image bytes: size only)"))


class Reject(_Strict):
    """redact's rejects.jsonl: one input line that could not become a Trace, where it was and why."""

    file: str
    line: int
    reason: str
    detail: str = ""


# ---------------------------------------------------------------- export artifacts (agentic-stack)
class TraceRecord(_Strict):
    id: str
    created_at: str
    project: str
    domain: str
    workflow: str
    skill: str | None = None
    host: str
    model_used: str | None = None
    input_summary: str | None = None
    input_hash: str
    raw_input_stored: Literal[False] = False
    pii_level: str
    redaction_status: str
    context_tokens_before: float | None = None
    context_tokens_after: float | None = None
    output_summary: str | None = None
    human_review: dict[str, Any]
    eval_tags: list[str] = Field(default_factory=list)
    failure_modes: list[str] = Field(default_factory=list)
    trainable: bool
    target_use: list[str]
    model_target: dict[str, Any] | None = None
    source_run_id_hash: str | None = None


class TrainingExampleMeta(_Open):
    """agentic-stack's required metadata (open to extras, as its schema is), plus ours, declared. The
    conversation itself is not repeated here: it is the trace `source_trace_ids[0]` in
    data/redact/traces.jsonl, which build_dataset reads."""

    domain: str
    workflow: str
    source_trace_ids: list[str]
    split: str
    pii_level: str
    trainable: bool
    bucket: Bucket | None = None
    source: str | None = None
    outcome: Outcome | None = None
    created_at: str | None = Field(None, description="the trace's stamp; absent when it has none")


class TrainingExample(_Strict):
    instruction: str
    context: str
    input: str
    output: str
    metadata: TrainingExampleMeta


class EvalCase(_Strict):
    id: str
    domain: str
    workflow: str
    input_redacted: str
    expected_behavior: list[str]
    forbidden_behavior: list[str]
    rubric: list[str]
    tags: list[str]
    source_trace_ids: list[str]


class ContextCard(_Strict):
    id: str
    domain: str
    workflow: str
    goal: str
    stable_rules: list[str]
    tool_contracts: list[str] = Field(default_factory=list)
    human_approval_required_for: list[str]
    source_trace_count: int = Field(ge=0)
    token_budget: int = Field(ge=0)
    eval_refs: list[str]
    version: str


class Readiness(_Strict):
    approved: int
    negatives: int
    tier: str
    next_tier: str | None
    missing_for_next: int
    tiers: dict[str, bool]


class FlywheelMetrics(_Open):
    generated_at: str
    privacy_model: str
    total_traces: int = Field(ge=0)
    accepted_traces: int = Field(ge=0)
    trainable_traces: int = Field(ge=0)
    redaction_pass_rate: float = Field(ge=0, le=1)
    avg_context_tokens_before: float | None = None
    avg_context_tokens_after: float | None = None
    context_reduction_pct: float | None = None
    thresholds: dict[str, Any] = Field(default_factory=dict)
    workflows: dict[str, Any]


# ---------------------------------------------------------------- build_dataset
class SplitRow(_Strict):
    """openclaw's row shape (`source`, `messages`) plus our metadata."""

    id: str
    source: str
    bucket: Bucket
    domain: str
    workflow: str
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    trace_id: str
    eval_case_id: str | None = None
    expected_behavior: list[str] | None = None
    forbidden_behavior: list[str] | None = None


class Exclusion(_Strict):
    """build_dataset's excluded.jsonl: a trace that is in no split, and why; `survivor` names the row id
    (or eval row id) it duplicates, for the dedup and overlap reasons."""

    trace_id: str
    reason: str
    survivor: str | None = None


class ManifestInputs(_Open):
    raw_trace_glob: str
    raw_trace_files: list[str]
    synthetic_file: str
    adversarial_file: str


class ManifestBuild(_Open):
    target_examples: int
    selected_examples: int
    train_examples: int
    val_examples: int
    eval_examples: int
    min_examples: int
    min_example_ok: bool
    val_ratio: float
    ratios: dict[str, float]
    min_redaction_rate: float
    redaction_ok: bool
    redaction_rate: float


class ManifestQC(_Open):
    raw_rows: int
    rejected_malformed: int
    rejected_low_signal: int
    rows_with_redactions: int
    redactions_applied: int
    post_dedup_rows: int
    category_counts: dict[str, int]
    outcome_counts: dict[str, int]


class DatasetManifest(_Open):
    """Every field of openclaw-ft's dataset_manifest.example.json, plus our accounting."""

    contract_version: str
    inputs: ManifestInputs
    build: ManifestBuild
    qc: ManifestQC
    seed: int
    digest: str
    input_digests: dict[str, str]
    buckets: dict[str, dict[str, int]]
    duplicates: dict[str, int]
    rejects_by_reason: dict[str, int]
    filtered_by_reason: dict[str, int]
    length_percentiles: dict[str, dict[str, float]]
    accounting: dict[str, Any]
    rescan: dict[str, Any]
    split_digests: dict[str, str]
    traces_by_file: dict[str, int]


# ---------------------------------------------------------------- leaks
class LeakHit(_Strict):
    """Where a detector or canary fired: never the value (the report itself must not leak)."""

    file: str
    line: int = Field(description="1-based; 0 when the place in the file is not a line (a safetensors header)")
    detector: str


class CanaryCounts(_Strict):
    plain: int = Field(ge=0)
    sha256: int = Field(ge=0)


class LeakReport(_Strict):
    """leaks' leak_report.json, which gate reads (`leak_scan_ok`): counts always complete, the hit list capped
    at leaks.max_hits_listed."""

    ok: bool = Field(description="no hit of a detector outside leaks.ignore_detectors")
    hits_total: int = Field(ge=0)
    hits_failing: int = Field(ge=0)
    hits: list[LeakHit]
    hits_listed: int = Field(ge=0)
    by_detector: dict[str, int]
    by_file: dict[str, int]
    files_scanned: int = Field(ge=0)
    skipped_binary: int = Field(ge=0)
    lines_scanned: int = Field(ge=0)
    bytes_scanned: int = Field(ge=0)
    scanned: list[str] = Field(description="the paths given to --scan, relative to the repository")
    canaries: CanaryCounts
    ignored_detectors: list[str]
