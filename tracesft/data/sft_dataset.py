"""From verified traces to the SFT train/validation split, and a summary a person can read.

The split is by problem, not by record: two traces of the same query never straddle the split,
so validation loss measures generalisation to unseen problems.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter

from pydantic import BaseModel

from tracesft.data.traces import TraceBatch, TraceRecord


class SFTDataset(BaseModel):
    train: list[TraceRecord]
    validation: list[TraceRecord]
    content_hash: str  # of the ingested traces, for lineage
    validation_fraction: float
    seed: int

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
    )


def summarize(dataset: SFTDataset) -> str:
    """Markdown summary: sizes, label balance, trace lengths and sources of each split."""
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
    return "\n".join(lines) + "\n"
