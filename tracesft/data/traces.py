"""The trace record: one teacher answer to one Corr2Cause problem, with where it came from.

Every later stage (verification, validation, the SFT split) passes these around, so provenance
(`source`, `locator`) travels with each record and any message about it can point at the exact
file and record the user has to look at.
"""

from __future__ import annotations

from typing import Literal

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


# Why a path found inside a traces folder was not read. `already_read`: another path (a link, or
# the same file given twice) led to a file that was read; the others name what the path was.
IgnoreReason = Literal[
    "wrong_extension", "hidden", "dangling_link", "link_loop", "already_read", "not_a_regular_file", "unreadable"
]


class IgnoredFile(BaseModel):
    """A path inside a traces folder that ingestion did not read, kept so that no file is left out unseen."""

    path: str
    reason: IgnoreReason


class TraceBatch(BaseModel):
    """All records of one ingestion, with a content hash of the inputs that produced them."""

    records: list[TraceRecord]
    content_hash: str
    files: list[str]
    run_metadata: dict[str, dict] = {}  # per file: the non-list fields of a JSON results object
    skipped: list[SkippedRecord] = []  # unreadable records skipped on request, each reported
    ignored: list[IgnoredFile] = []  # paths inside the traces folders that were not read, each with why


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
