"""Reading GPT evaluation results in the shapes evaluation harnesses actually write.

Accepted: a JSON list of records, a JSON object holding the list under `predictions` or
`results` (its other fields are kept as run metadata), or JSONL; any mix of files and
directories (a directory contributes its `*.json` and `*.jsonl` files, so new result files can
simply be dropped into it). Field names differ between harnesses, hence the aliases below and a
user mapping for anything else. A record that cannot be read stops ingestion with a message that
names the file, the record and the field: silently dropping it would bias the training data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from tracesft.errors import TracesftError
from tracesft.traces import TraceBatch, TraceRecord

FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "query": ("input", "query", "prompt", "question"),
    "trace": ("response", "reasoning", "generated_text", "output"),
    "predicted": ("prediction", "predicted_answer", "answer"),
    "gold": ("label", "ground_truth", "ground_truth_label", "gold"),
    "flagged_correct": ("correct", "is_correct"),
}
REQUIRED_FIELDS = ("query", "trace", "gold")
RESULT_FILE_SUFFIXES = (".json", ".jsonl")
_LIST_KEYS = ("predictions", "results")
_GOLD_WORDS = {"1": 1, "yes": 1, "true": 1, "valid": 1, "0": 0, "no": 0, "false": 0, "invalid": 0}


def discover_result_files(paths: list[str]) -> list[Path]:
    """Expand directories into their result files, sorted, so the order is reproducible."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in RESULT_FILE_SUFFIXES)
            if not found:
                raise TracesftError(f"{path}: directory holds no *.json or *.jsonl result files.")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise TracesftError(f"{path}: no such file or directory (check the `traces` setting).")
    return files


def content_hash(paths: list[str]) -> str:
    """SHA-256 over the names and bytes of the result files: the cache key of ingestion.

    File times are deliberately left out, so touching a file reruns nothing, while any change
    of content (or a new file in a watched directory) does.
    """
    digest = hashlib.sha256()
    for file in discover_result_files(paths):
        digest.update(file.name.encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def ingest(paths: list[str], field_map: dict[str, str] | None = None) -> TraceBatch:
    """Read every record of every result file into `TraceRecord`s with provenance."""
    unknown = set(field_map or {}) - set(FIELD_ALIASES)
    if unknown:
        raise TracesftError(
            f"field_map: unknown field(s) {sorted(unknown)}; map any of {sorted(FIELD_ALIASES)}, "
            "e.g. `field_map: {query: problem_text}`."
        )
    files = discover_result_files(paths)
    records: list[TraceRecord] = []
    metadata: dict[str, dict] = {}
    for file in files:
        raw_records, file_metadata = _read_result_file(file)
        if file_metadata:
            metadata[str(file)] = file_metadata
        records.extend(_to_record(raw, str(file), locator, field_map or {}) for locator, raw in raw_records)
    return TraceBatch(
        records=records, content_hash=content_hash(paths), files=[str(f) for f in files], run_metadata=metadata
    )


def _read_result_file(file: Path) -> tuple[list[tuple[str, Any]], dict]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TracesftError(
            f"{file}: not UTF-8 text (byte {err.start} cannot be decoded); re-save the file as UTF-8."
        ) from None
    if file.suffix == ".jsonl":
        return list(_jsonl_records(file, text)), {}
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise TracesftError(
            f"{file}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}). "
            "If it holds one JSON object per line, name it *.jsonl."
        ) from None
    if isinstance(document, dict):
        key = next((k for k in _LIST_KEYS if isinstance(document.get(k), list)), None)
        if key is None:
            raise TracesftError(
                f"{file}: a JSON object must hold its records as a list under "
                f"{' or '.join(repr(k) for k in _LIST_KEYS)}; found keys {sorted(document)}."
            )
        items, metadata = document[key], {k: v for k, v in document.items() if k != key}
    elif isinstance(document, list):
        items, metadata = document, {}
    else:
        raise TracesftError(f"{file}: expected a JSON list of records or an object holding one.")
    return [(f"record {i}", item) for i, item in enumerate(items, start=1)], metadata


def _jsonl_records(file: Path, text: str) -> Iterator[tuple[str, Any]]:
    # Split on newlines only: str.splitlines() also breaks at U+2028 and friends, which JSON
    # writers leave unescaped inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise TracesftError(f"{file} (line {number}): not valid JSON ({err.msg}); fix or remove the line.") from None


def _to_record(raw: Any, source: str, locator: str, field_map: dict[str, str]) -> TraceRecord:
    where = f"{source} ({locator})"
    if not isinstance(raw, dict):
        raise TracesftError(f"{where}: expected a JSON object, found {type(raw).__name__}.")
    values: dict[str, Any] = {}
    for field, aliases in FIELD_ALIASES.items():
        candidates = (field_map[field],) if field in field_map else aliases
        name = next((c for c in candidates if raw.get(c) is not None), None)
        if name is None:
            if field in REQUIRED_FIELDS:
                raise TracesftError(
                    f"{where}: missing field {field!r} (looked for {', '.join(candidates)}). "
                    f"Map the harness's own name in the run configuration: `field_map: {{{field}: <name>}}`."
                )
            continue
        values[field] = raw[name]
    for field in ("query", "trace"):
        if not isinstance(values[field], str) or not values[field].strip():
            raise TracesftError(f"{where}: field {field!r} must be non-empty text.")
    values["gold"] = _parse_gold(values["gold"], where)
    if "predicted" in values:
        values["predicted"] = str(values["predicted"])
    if "flagged_correct" in values and not isinstance(values["flagged_correct"], bool):
        raise TracesftError(f"{where}: the correctness flag must be true or false, got {values['flagged_correct']!r}.")
    return TraceRecord(source=source, locator=locator, **values)


def _parse_gold(value: Any, where: str) -> int:
    key = str(value).strip().lower() if not isinstance(value, bool) else str(value).lower()
    if key not in _GOLD_WORDS:
        raise TracesftError(f"{where}: gold label {value!r} is not one of 0/1, yes/no, true/false, valid/invalid.")
    return _GOLD_WORDS[key]
