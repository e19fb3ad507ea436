"""From verified traces to the SFT train/validation split, and a summary a person can read.

The split is by problem, not by record: two traces of the same query never straddle the split,
so validation loss measures generalisation to unseen problems. The dataset carries what
ingestion skipped (`on_bad_record: skip`) and the paths it left unread, so the artifact that
training reads says what it was not built from.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter

from pydantic import BaseModel

from tracesft.data.traces import IgnoredFile, SkippedRecord, TraceBatch, TraceRecord


class SFTDataset(BaseModel):
    train: list[TraceRecord]
    validation: list[TraceRecord]
    content_hash: str  # of the ingested traces, for lineage
    validation_fraction: float
    seed: int
    skipped: list[SkippedRecord] = []  # unreadable records ingestion skipped, as in the batch
    ignored: list[IgnoredFile] = []  # paths inside the traces folders ingestion did not read

    def queries(self) -> set[str]:
        return {normalize_query(r.query) for r in self.train + self.validation}


def normalize_query(query: str) -> str:
    return " ".join(query.split())


def build_sft_dataset(batch: TraceBatch, validation_fraction: float, seed: int) -> SFTDataset:
    groups: dict[str, list[TraceRecord]] = {}
    for record in batch.records:
        groups.setdefault(normalize_query(record.query), []).append(record)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_validation = round(len(keys) * validation_fraction) if len(keys) > 1 else 0
    n_validation = min(max(n_validation, 1 if len(keys) > 1 else 0), len(keys) - 1)
    validation = [r for k in keys[:n_validation] for r in groups[k]]
    train = [r for k in keys[n_validation:] for r in groups[k]]
    return SFTDataset(
        train=train,
        validation=validation,
        content_hash=batch.content_hash,
        validation_fraction=validation_fraction,
        seed=seed,
        skipped=batch.skipped,
        ignored=batch.ignored,
    )


def summarize(dataset: SFTDataset) -> str:
    """Markdown summary: sizes, label balance, trace lengths and sources of each split; every
    record skipped and every path left unread at ingestion."""
    lines = [
        "# SFT dataset",
        "",
        f"Traces content hash: `{dataset.content_hash[:16]}`, split seed {dataset.seed}, "
        f"validation fraction {dataset.validation_fraction}.",
        "",
        "| split | records | yes | no | median trace words | max trace words |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, records in (("train", dataset.train), ("validation", dataset.validation)):
        words = [len(r.trace.split()) for r in records] or [0]
        labels = Counter(r.gold for r in records)
        lines.append(
            f"| {name} | {len(records)} | {labels[1]} | {labels[0]} | {statistics.median(words):.0f} | {max(words)} |"
        )
    sources = Counter(r.source for r in dataset.train + dataset.validation)
    lines += ["", "| source file | records |", "| --- | --- |"]
    lines += [f"| `{source}` | {count} |" for source, count in sorted(sources.items())]
    if dataset.skipped:
        lines += ["", f"{len(dataset.skipped)} unreadable record(s) skipped at ingestion (`on_bad_record: skip`):", "",
                  "| file | record | why |", "| --- | --- | --- |"]
        lines += [f"| `{s.source}` | {s.locator} | {_cell(s.error)} |" for s in dataset.skipped]
    if dataset.ignored:
        lines += ["", f"{len(dataset.ignored)} path(s) in the traces folders not read:", "",
                  "| path | why |", "| --- | --- |"]
        lines += [f"| `{i.path}` | {i.reason} |" for i in dataset.ignored]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text that stays inside one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")
