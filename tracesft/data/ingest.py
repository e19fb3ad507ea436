"""Reading GPT evaluation results in the shapes evaluation harnesses actually write.

Accepted: a JSON list of records, a JSON object holding the list under `predictions` or
`results` (its other fields are kept as run metadata), or JSONL; any mix of files and
folders. A folder means what a user means by "this folder": every `*.json` and `*.jsonl` file
in it or any subfolder, the extension in any case (`.JSONL` too), in sorted order so a run is
reproducible; symbolic links are followed, each file is read once however many paths lead to it.
Hidden entries (`.git`, `.ipynb_checkpoints`), other extensions (`README.md`), dangling links,
link loops and entries that cannot be opened are not read, and every one of them is listed with
its reason in `TraceBatch.ignored`: a trace file that was never read must not look like one that
held no traces. A path given explicitly is read whatever its extension, and a missing one stops
ingestion.

Field names differ between harnesses, hence the aliases below and a user mapping for anything
else. A record that cannot be read stops ingestion with a message that names the file, the
record and the field: silently dropping it would bias the training data. Where one broken line
in a large JSONL file should not block a run, `on_bad_record="skip"` skips such records instead,
and every skipped one is listed in the batch (file, line or record, and why), so it is reported,
never silently lost. Whole-file problems (empty, not JSON at all) always stop ingestion. JSONL
files are streamed line by line, so a large file never sits in memory twice.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from tracesft.errors import TracesftError
from tracesft.data.traces import IgnoredFile, IgnoreReason, SkippedRecord, TraceBatch, TraceRecord
from tracesft.user_paths import jsonl_lines, read_text

OnBadRecord = Literal["error", "skip"]

FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "query": ("input", "query", "prompt", "question"),
    "trace": ("response", "reasoning", "generated_text", "output"),
    "predicted": ("prediction", "predicted_answer", "answer"),
    "gold": ("label", "ground_truth", "ground_truth_label", "gold"),
    "flagged_correct": ("correct", "is_correct"),
}
REQUIRED_FIELDS = ("query", "trace", "gold")
RESULT_FILE_SUFFIXES = (".json", ".jsonl")  # compared in lower case
_LIST_KEYS = ("predictions", "results")
_GOLD_WORDS = {"1": 1, "yes": 1, "true": 1, "valid": 1, "0": 0, "no": 0, "false": 0, "invalid": 0}


@dataclass(frozen=True)
class ResultFile:
    """A file ingestion reads, and the name the content hash records for it."""

    path: Path
    name: str  # the path below the folder it was found in (the file name if given itself)
    identity: tuple[int, int]  # device and inode of what the path leads to: read each file once


@dataclass(frozen=True)
class Discovery:
    files: list[ResultFile]
    ignored: list[IgnoredFile]


def discover_result_files(paths: list[str]) -> Discovery:
    """The files to read, in a reproducible order, and every path inside a folder left unread, with why."""
    files: list[ResultFile] = []
    ignored: list[IgnoredFile] = []
    read: set[tuple[int, int]] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            candidates = list(_walk_folder(path, ignored))
            if not candidates:
                raise TracesftError(_no_result_files(path, ignored))
        elif path.is_file():
            candidates = [ResultFile(path, path.name, _identity(path.stat()))]
        elif path.is_symlink():
            raise TracesftError(f"{path}: a symbolic link that leads nowhere (its target is missing, or it loops); "
                                "fix the link or the `traces` setting.")
        else:
            raise TracesftError(f"{path}: no such file or directory (check the `traces` setting).")
        for candidate in candidates:
            if candidate.identity in read:
                ignored.append(IgnoredFile(path=str(candidate.path), reason="already_read"))
            else:
                read.add(candidate.identity)
                files.append(candidate)
    return Discovery(files=files, ignored=ignored)


def _walk_folder(root: Path, ignored: list[IgnoredFile]) -> Iterator[ResultFile]:
    """Depth first, entries sorted by name; a folder already on the way down is a link loop."""

    def walk(folder: Path, ancestors: frozenset[tuple[int, int]]) -> Iterator[ResultFile]:
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            if folder == root:
                raise TracesftError(f"{root}: cannot list the folder ({err.strerror}); check its permissions.") from None
            ignored.append(IgnoredFile(path=str(folder), reason="unreadable"))
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                status: os.stat_result | OSError = path.stat()  # follows a link, as a user means it
            except OSError as err:
                status = err
            reason = _unread_reason(entry, status, ancestors)
            if reason is not None:
                ignored.append(IgnoredFile(path=str(path), reason=reason))
            elif stat.S_ISDIR(status.st_mode):
                yield from walk(path, ancestors | {_identity(status)})
            else:
                yield ResultFile(path, path.relative_to(root).as_posix(), _identity(status))

    yield from walk(root, frozenset({_identity(root.stat())}))


def _unread_reason(
    entry: os.DirEntry, status: os.stat_result | OSError, ancestors: frozenset[tuple[int, int]]
) -> IgnoreReason | None:
    """Why an entry of a folder is not read; None for a subfolder to walk or a result file to read."""
    if entry.name.startswith("."):
        return "hidden"
    if isinstance(status, OSError):
        if status.errno == errno.ELOOP:
            return "link_loop"
        return "dangling_link" if entry.is_symlink() and status.errno == errno.ENOENT else "unreadable"
    if stat.S_ISDIR(status.st_mode):
        return "link_loop" if _identity(status) in ancestors else None
    if not stat.S_ISREG(status.st_mode):
        return "not_a_regular_file"
    if Path(entry.name).suffix.lower() not in RESULT_FILE_SUFFIXES:
        return "wrong_extension"
    return None if os.access(entry.path, os.R_OK) else "unreadable"


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _no_result_files(folder: Path, ignored: list[IgnoredFile]) -> str:
    inside = [i for i in ignored if Path(i.path).is_relative_to(folder)]
    shown = ", ".join(f"{Path(i.path).relative_to(folder)} ({i.reason})" for i in inside[:5])
    more = f" and {len(inside) - 5} more" if len(inside) > 5 else ""
    return (f"{folder}: holds no result files (*.json or *.jsonl in any case, in it or any subfolder)"
            + (f"; ignored: {shown}{more}." if inside else ".")
            + " Put the GPT result files there, or point `traces` at them.")


def content_hash(paths: list[str]) -> str:
    """SHA-256 over the names and bytes of the result files: the cache key of ingestion."""
    return _digest(discover_result_files(paths).files)


def _digest(files: list[ResultFile]) -> str:
    """Covers exactly the files ingestion reads, each under its path below its folder.

    File times are deliberately left out, so touching a file reruns nothing, while any change
    of content, a new file anywhere below a watched folder, or a file moved between subfolders
    does. Ignored entries (a README, a hidden folder, a dangling link) are not read and change nothing.
    """
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def ingest(paths: list[str], field_map: dict[str, str] | None = None, on_bad_record: OnBadRecord = "error") -> TraceBatch:
    """Read every record of every result file into `TraceRecord`s with provenance.

    `on_bad_record="skip"` lists unreadable records in `TraceBatch.skipped` instead of stopping.
    """
    unknown = set(field_map or {}) - set(FIELD_ALIASES)
    if unknown:
        raise TracesftError(
            f"field_map: unknown field(s) {sorted(unknown)}; map any of {sorted(FIELD_ALIASES)}, "
            "e.g. `field_map: {query: problem_text}`."
        )
    if on_bad_record not in ("error", "skip"):
        raise TracesftError(f"on_bad_record: {on_bad_record!r} is not one of 'error', 'skip'.")
    discovery = discover_result_files(paths)
    records: list[TraceRecord] = []
    skipped: list[SkippedRecord] = []
    metadata: dict[str, dict] = {}
    for file in (result.path for result in discovery.files):
        if file.stat().st_size == 0:
            raise TracesftError(f"{file}: the file is empty; remove it or write its records into it.")
        raw_records, file_metadata = _jsonl_records(file) if file.suffix.lower() == ".jsonl" else _read_json_file(file)
        if file_metadata:
            metadata[str(file)] = file_metadata
        found = 0
        for locator, raw in raw_records:
            found += 1
            try:
                if isinstance(raw, TracesftError):
                    raise raw
                records.append(_to_record(raw, str(file), locator, field_map or {}))
            except TracesftError as err:
                if on_bad_record == "error":
                    raise
                skipped.append(SkippedRecord(source=str(file), locator=locator, error=str(err)))
        if not found:
            raise TracesftError(f"{file}: holds no records (only blank lines or an empty list).")
    return TraceBatch(
        records=records,
        content_hash=_digest(discovery.files),
        files=[str(result.path) for result in discovery.files],
        run_metadata=metadata,
        skipped=skipped,
        ignored=discovery.ignored,
    )


def _read_json_file(file: Path) -> tuple[list[tuple[str, Any]], dict]:
    try:
        document = json.loads(read_text(file, "result file"))
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


def _jsonl_records(file: Path) -> tuple[Iterator[tuple[str, Any]], dict]:
    """Stream (locator, record) pairs; a line that cannot be read yields its `TracesftError`."""

    def lines() -> Iterator[tuple[str, Any]]:
        for number, line in jsonl_lines(file, "result file"):
            if isinstance(line, TracesftError):
                yield f"line {number}", line
            elif line.strip():
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"line {number}", TracesftError(f"{file} (line {number}): not valid JSON ({err.msg}); fix or remove the line.")

    return lines(), {}


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
