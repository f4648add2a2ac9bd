"""One model per params.yaml section of the data stages. extra="forbid": a typo is an error, not a no-op."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RedactParams(_Params):
    ip_public_only: bool = Field(True, description="leave private, loopback and documentation IPs alone")
    entropy_threshold: float = Field(3.5, gt=0, description="Shannon bits/char for unknown tokens in secret-like contexts")
    entropy_min_len: int = Field(20, ge=8)
    disabled_detectors: list[str] = Field(default_factory=list, description="detector names to switch off")
    trust_status: Literal[False] = Field(False, description="never true: a 'passed' flag is not evidence")
    untrusted_statuses: list[str] = Field(
        default_factory=lambda: ["failed", "needs_review"],
        description="source redaction_status values that make a run ineligible for training",
    )
    max_line_bytes: int = Field(4_000_000, ge=1024, description="longer lines are rejected, not parsed")
    workers: int = Field(0, ge=0, description="processes for redaction; 0 = one per core")
    canaries: list[str] = Field(default_factory=list, description="strings that must never appear in any output")
    canary_sha256: list[str] = Field(default_factory=list, description="SHA-256 of such strings, to keep them out of params")
    keep_documentation_emails: bool = Field(
        True, description="keep addresses at RFC 2606 names (example.com/.org/.net, *.test, *.example): no one's mailbox")
    names: bool = Field(False, description="also redact person names and street addresses (context-gated recogniser)")


class ExportParams(_Params):
    eval_share: float = Field(0.15, ge=0, lt=1, description="hash share of each workflow held out as eval cases")
    seed: int = 0
    min_rule_support: int = Field(3, ge=1, description="approved runs that must state a rule before a card keeps it")
    min_rule_share: float = Field(0.0, ge=0, le=1, description="...and the share of the workflow's approved runs")
    card_token_budget: int = Field(800, ge=0)
    max_rules_per_card: int = Field(12, ge=1)
    approved_statuses: list[str] = Field(default_factory=lambda: ["accepted", "edited"])
    privacy_model: str = "local-only; redacted before export; ids keyed-hashed; no raw inputs stored"
    readiness_tiers: dict[str, int] = Field(
        default_factory=lambda: {"context_card": 10, "eval_set": 25, "measurement": 100,
                                 "adapter_candidate": 500, "adapter": 2000, "adapter_with_negatives": 10000},
        description="approved traces per workflow at which each flywheel tier opens, lowest first",
    )
    negatives_share_for_top_tier: float = Field(0.1, ge=0, le=1, description="negatives/approved needed by the last tier")
    workers: int = Field(0, ge=0, description="processes that turn traces into lines; 0 = one per core (same bytes)")


class BuildDatasetParams(_Params):
    seed: int = 0
    val_ratio: float = Field(0.1, ge=0, lt=1)
    target_examples: int = Field(20000, ge=1)
    min_examples: int = Field(100, ge=0)
    ratios: dict[Literal["real", "synthetic", "adversarial"], float] = Field(
        default_factory=lambda: {"real": 0.6, "synthetic": 0.3, "adversarial": 0.1}
    )
    min_chars: int = Field(8, ge=0, description="shortest prompt+answer kept")
    max_chars: int = Field(16000, ge=1)
    min_answer_chars: int = Field(1, ge=0)
    exclude_failed: bool = True
    near_dedup_threshold: float = Field(0.9, gt=0, le=1, description="MinHash Jaccard at or above which rows are near-duplicates")
    near_dedup_num_perm: int = Field(64, ge=16)
    near_dedup_shingle: int = Field(5, ge=1, description="word n-gram size")
    min_redaction_rate: float = Field(0.0, ge=0, le=1)
    contract_version: str = "1.0"
    workers: int = Field(0, ge=0, description="processes for parsing, signatures and the rescan; 0 = one per core (same bytes)")

    @model_validator(mode="after")
    def _ratios_sum(self) -> "BuildDatasetParams":
        total = sum(self.ratios.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"build_dataset.ratios must sum to 1, got {total}")
        return self


class LeaksParams(_Params):
    """The leak scan over every artifact; its detectors and canaries are redact's (params `redact`)."""

    workers: int = Field(0, ge=0, description="processes for the scan; 0 = one per core")
    max_hits_listed: int = Field(1000, ge=0, description="hits beyond this are counted by file and detector, not listed")
    ignore_detectors: list[str] = Field(
        default_factory=list, description="detectors whose hits are reported but do not fail the scan (canary can't be)"
    )
