"""The trace record: one teacher answer to one Corr2Cause problem, with where it came from.

Every later stage (verification, validation, the SFT split) passes these around, so provenance
(`source`, `locator`) travels with each record and any message about it can point at the exact
file and record the user has to look at.
"""

from __future__ import annotations

from pydantic import BaseModel


class TraceRecord(BaseModel):
    query: str
    trace: str
    gold: int  # 1: the hypothesis necessarily follows ("Yes"), 0: it does not ("No")
    predicted: str | None = None  # the harness's own answer field, kept for the flag check
    flagged_correct: bool | None = None  # the harness's `correct` flag, never trusted alone
    source: str
    locator: str  # "record 3" (JSON) or "line 12" (JSONL), 1-based

    @property
    def where(self) -> str:
        return f"{self.source} ({self.locator})"


class SkippedRecord(BaseModel):
    """A record ingestion could not read and skipped (only with `on_bad_record: skip`)."""

    source: str
    locator: str
    error: str


class TraceBatch(BaseModel):
    """All records of one ingestion, with a content hash of the inputs that produced them."""

    records: list[TraceRecord]
    content_hash: str
    files: list[str]
    run_metadata: dict[str, dict] = {}  # per file: the non-list fields of a JSON results object
    skipped: list[SkippedRecord] = []  # unreadable records skipped on request, each reported


class RejectedTrace(BaseModel):
    record: TraceRecord
    reason: str
    detail: str


class VerificationResult(BaseModel):
    kept: TraceBatch
    rejected: list[RejectedTrace]

    def rejected_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rejection in self.rejected:
            counts[rejection.reason] = counts.get(rejection.reason, 0) + 1
        return dict(sorted(counts.items()))
