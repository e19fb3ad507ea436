"""Ingestion of GPT result files: every accepted shape, every alias, provenance, the cache key,
and a clear `TracesftError` (file, record or line, field) for every kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tracesft.errors import TracesftError
from tracesft.data.ingest import FIELD_ALIASES, content_hash, ingest
from tracesft.data.traces import TraceBatch

QUERY = "Premise: A correlates with B.\nHypothesis: A directly causes B."
TRACE = "A correlation alone does not fix the direction of the edge.\n\nAnswer: No"


def record(**fields: Any) -> dict[str, Any]:
    """A valid record in the most common harness shape; keyword arguments add or replace fields."""
    base: dict[str, Any] = {"input": QUERY, "response": TRACE, "label": 0}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_results(path: Path, records: list[Any]) -> Path:
    """A result file in the format its extension (in any case) says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(path, records) if path.suffix.lower() == ".jsonl" else write_json(path, records)


def ignored(batch: TraceBatch, folder: Path | None = None) -> dict[str, str]:
    """The batch's ignored paths, relative to `folder` (the first one read from, by default), with their reasons."""
    folder = folder or Path(batch.files[0]).parent
    return {Path(i.path).relative_to(folder).as_posix(): i.reason for i in batch.ignored}


def raises_naming(paths: list[str], *parts: str, field_map: dict[str, str] | None = None) -> str:
    """Ingest, expect a TracesftError, and check that its message names every part."""
    with pytest.raises(TracesftError) as excinfo:
        ingest(paths, field_map)
    message = str(excinfo.value)
    for part in parts:
        assert part in message, f"{part!r} not in error message {message!r}"
    return message


# --- accepted shapes -------------------------------------------------------------------------


def test_json_list(tmp_path: Path) -> None:
    file = write_json(tmp_path / "run.json", [record(), record(label=1, response="...\n\nAnswer: Yes")])
    batch = ingest([str(file)])
    assert [r.gold for r in batch.records] == [0, 1]
    assert batch.records[0].query == QUERY
    assert batch.records[0].trace == TRACE
    assert batch.files == [str(file)]
    assert batch.run_metadata == {}


@pytest.mark.parametrize("key", ["predictions", "results"])
def test_json_object_keeps_metadata(tmp_path: Path, key: str) -> None:
    document = {"model": "gpt-4o", "temperature": 0.0, "split": "test", key: [record(), record()]}
    file = write_json(tmp_path / "run.json", document)
    batch = ingest([str(file)])
    assert len(batch.records) == 2
    assert batch.run_metadata == {str(file): {"model": "gpt-4o", "temperature": 0.0, "split": "test"}}


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    file = tmp_path / "run.jsonl"
    file.write_text(json.dumps(record()) + "\n\n   \n" + json.dumps(record(label=1)) + "\n", encoding="utf-8")
    batch = ingest([str(file)])
    assert [r.gold for r in batch.records] == [0, 1]
    assert [r.locator for r in batch.records] == ["line 1", "line 4"]
    assert batch.run_metadata == {}


def test_directory_of_mixed_files_is_sorted_and_filtered(tmp_path: Path) -> None:
    folder = tmp_path / "traces"
    folder.mkdir()
    write_jsonl(folder / "b_run.jsonl", [record(input="query b1"), record(input="query b2")])
    write_json(folder / "a_run.json", {"model": "gpt-4o", "predictions": [record(input="query a1")]})
    write_json(folder / "c_run.json", [record(input="query c1")])
    (folder / "notes.txt").write_text("not a result file")
    (folder / "summary.csv").write_text("input,label\nx,1\n")
    (folder / "nested").mkdir()
    write_json(folder / "nested" / "d_run.json", [record(input="nested")])

    batch = ingest([str(folder)])

    assert batch.files == [str(folder / n) for n in ("a_run.json", "b_run.jsonl", "c_run.json", "nested/d_run.json")]
    assert [r.query for r in batch.records] == ["query a1", "query b1", "query b2", "query c1", "nested"]
    assert list(batch.run_metadata) == [str(folder / "a_run.json")]
    assert ignored(batch) == {"notes.txt": "wrong_extension", "summary.csv": "wrong_extension"}


def test_files_and_directories_can_be_mixed(tmp_path: Path) -> None:
    folder = tmp_path / "traces"
    folder.mkdir()
    write_json(folder / "x.json", [record(input="in folder")])
    single = write_jsonl(tmp_path / "extra.jsonl", [record(input="single file")])
    batch = ingest([str(single), str(folder)])
    assert [r.query for r in batch.records] == ["single file", "in folder"]


# --- what "this folder" means: any case, subfolders, links; everything left unread is reported ---


@pytest.mark.parametrize("name", ["RUN.JSONL", "run.JsonL", "run.JSON", "Run.Json"])
def test_extension_in_any_case(tmp_path: Path, name: str) -> None:
    write_results(tmp_path / name, [record(), record(label=1)])
    batch = ingest([str(tmp_path)])
    assert batch.files == [str(tmp_path / name)]
    # Read as what the extension says: JSONL records are lines, JSON records are list items.
    assert [r.locator for r in batch.records] == (["line 1", "line 2"] if name.lower().endswith("l") else ["record 1", "record 2"])
    assert batch.ignored == []


def test_nested_folders_are_read_in_sorted_depth_first_order(tmp_path: Path) -> None:
    for name in ("c.json", "b/c/z.jsonl", "a.json", "b/a.json", "b/c/2026/11/late.json"):
        write_results(tmp_path / name, [record(input=name)])
    batch = ingest([str(tmp_path)])
    order = ["a.json", "b/a.json", "b/c/2026/11/late.json", "b/c/z.jsonl", "c.json"]
    assert [Path(f).relative_to(tmp_path).as_posix() for f in batch.files] == order
    assert [r.query for r in batch.records] == order
    assert batch.records[2].source == str(tmp_path / "b/c/2026/11/late.json")


def test_hidden_files_and_folders_are_ignored_and_reported(tmp_path: Path) -> None:
    write_json(tmp_path / "run.json", [record()])
    for name in (".git/objects/pack.json", ".ipynb_checkpoints/run-checkpoint.jsonl", "sub/.draft.json"):
        write_results(tmp_path / name, [record(input="hidden")])
    batch = ingest([str(tmp_path)])
    assert batch.files == [str(tmp_path / "run.json")] and [r.query for r in batch.records] == [QUERY]
    # A hidden folder is reported once, not file by file: it is not looked into.
    assert ignored(batch) == {".git": "hidden", ".ipynb_checkpoints": "hidden", "sub/.draft.json": "hidden"}


def test_a_hidden_folder_given_itself_is_read(tmp_path: Path) -> None:
    folder = tmp_path / ".tracesft" / "traces"  # the demo's own workspace is such a folder
    folder.mkdir(parents=True)
    write_json(folder / "run.json", [record()])
    assert ingest([str(folder)]).files == [str(folder / "run.json")]


def test_non_trace_files_are_ignored_and_reported(tmp_path: Path) -> None:
    write_json(tmp_path / "run.json", [record()])
    (tmp_path / "README.md").write_text("# GPT-4o on Corr2Cause, November run\n")
    (tmp_path / "scores.csv").write_text("f1\n0.5\n")
    (tmp_path / "run.json.bak").write_text("[]")
    batch = ingest([str(tmp_path)])
    assert batch.files == [str(tmp_path / "run.json")]
    assert ignored(batch) == {"README.md": "wrong_extension", "run.json.bak": "wrong_extension", "scores.csv": "wrong_extension"}


def test_dangling_symlink_is_reported_not_fatal(tmp_path: Path) -> None:
    write_json(tmp_path / "run.json", [record()])
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "moved-away.jsonl")
    batch = ingest([str(tmp_path)])
    assert batch.files == [str(tmp_path / "run.json")]
    assert ignored(batch) == {"gone.jsonl": "dangling_link"}


def test_symlink_loops_are_reported_not_fatal(tmp_path: Path) -> None:
    write_json(tmp_path / "run.json", [record()])
    (tmp_path / "self.jsonl").symlink_to(tmp_path / "self.jsonl")  # the kernel reports ELOOP
    (tmp_path / "ping.jsonl").symlink_to(tmp_path / "pong.jsonl")
    (tmp_path / "pong.jsonl").symlink_to(tmp_path / "ping.jsonl")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)  # a folder inside itself
    batch = ingest([str(tmp_path)])
    assert batch.files == [str(tmp_path / "run.json")]
    assert ignored(batch) == {"ping.jsonl": "link_loop", "pong.jsonl": "link_loop", "self.jsonl": "link_loop", "sub/up": "link_loop"}


def test_symlinks_are_followed_and_each_file_is_read_once(tmp_path: Path) -> None:
    elsewhere = tmp_path / "archive"
    elsewhere.mkdir()
    write_json(elsewhere / "old.json", [record(input="archived")])
    folder = tmp_path / "traces"
    folder.mkdir()
    write_json(folder / "run.json", [record()])
    (folder / "archive").symlink_to(elsewhere, target_is_directory=True)
    (folder / "zz-latest.json").symlink_to(folder / "run.json")
    batch = ingest([str(folder), str(folder / "run.json")])
    # The first path in reading order reads a file; any later path to it is reported instead.
    assert batch.files == [str(folder / "archive" / "old.json"), str(folder / "run.json")]
    assert [r.query for r in batch.records] == ["archived", QUERY]
    assert [(i.path, i.reason) for i in batch.ignored] == [
        (str(folder / "zz-latest.json"), "already_read"), (str(folder / "run.json"), "already_read")
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its permissions")
def test_unreadable_file_and_folder_are_reported(tmp_path: Path) -> None:
    write_json(tmp_path / "run.json", [record()])
    locked = write_json(tmp_path / "locked.json", [record()])
    (tmp_path / "private").mkdir()
    locked.chmod(0), (tmp_path / "private").chmod(0)
    try:
        batch = ingest([str(tmp_path)])
    finally:
        locked.chmod(0o644), (tmp_path / "private").chmod(0o755)
    assert ignored(batch) == {"locked.json": "unreadable", "private": "unreadable"}


def test_a_dangling_link_given_explicitly_stops_ingestion(tmp_path: Path) -> None:
    link = tmp_path / "run.jsonl"
    link.symlink_to(tmp_path / "moved-away.jsonl")
    raises_naming([str(link)], str(link), "symbolic link that leads nowhere", "`traces`")


def test_a_file_given_explicitly_is_read_whatever_its_extension(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "export.JSONL", [record()])
    other = write_json(tmp_path / "export.txt", [record(label=1)])
    batch = ingest([str(file), str(other)])
    assert [(r.locator, r.gold) for r in batch.records] == [("line 1", 0), ("record 1", 1)]


# --- field names -----------------------------------------------------------------------------


def test_aliases_match_design() -> None:
    assert FIELD_ALIASES == {
        "query": ("input", "query", "prompt", "question"),
        "trace": ("response", "reasoning", "generated_text", "output"),
        "predicted": ("prediction", "predicted_answer", "answer"),
        "gold": ("label", "ground_truth", "ground_truth_label", "gold"),
        "flagged_correct": ("correct", "is_correct"),
    }


_DEFAULT_KEY = {"query": "input", "trace": "response", "gold": "label"}
_ALIAS_CASES = [(field, alias) for field, aliases in FIELD_ALIASES.items() for alias in aliases]


@pytest.mark.parametrize(("field", "alias"), _ALIAS_CASES, ids=[f"{f}-{a}" for f, a in _ALIAS_CASES])
def test_every_alias_is_read(tmp_path: Path, field: str, alias: str) -> None:
    value = {"query": "the query", "trace": "the trace\nAnswer: Yes", "gold": "yes", "predicted": "Yes", "flagged_correct": True}[field]
    raw = record()
    if field in _DEFAULT_KEY:
        del raw[_DEFAULT_KEY[field]]
    raw[alias] = value
    batch = ingest([str(write_json(tmp_path / "run.json", [raw]))])
    got = getattr(batch.records[0], field)
    assert got == (1 if field == "gold" else value)


def test_first_alias_wins_when_several_are_present(tmp_path: Path) -> None:
    raw = record(query="second alias", prompt="third alias")
    batch = ingest([str(write_json(tmp_path / "run.json", [raw]))])
    assert batch.records[0].query == QUERY  # `input` comes first


def test_null_alias_falls_through_to_the_next(tmp_path: Path) -> None:
    raw = record(question="the real query")
    raw["input"] = None
    batch = ingest([str(write_json(tmp_path / "run.json", [raw]))])
    assert batch.records[0].query == "the real query"


def test_optional_fields_absent(tmp_path: Path) -> None:
    batch = ingest([str(write_json(tmp_path / "run.json", [record()]))])
    assert batch.records[0].predicted is None
    assert batch.records[0].flagged_correct is None


def test_predicted_is_kept_as_text(tmp_path: Path) -> None:
    batch = ingest([str(write_json(tmp_path / "run.json", [record(prediction=True)]))])
    assert batch.records[0].predicted == "True"


def test_field_map_for_a_custom_name(tmp_path: Path) -> None:
    raw = {"problem_text": "custom query", "completion": TRACE, "verdict": "no", "ok": False}
    file = write_json(tmp_path / "run.json", [raw])
    batch = ingest(
        [str(file)], {"query": "problem_text", "trace": "completion", "gold": "verdict", "flagged_correct": "ok"}
    )
    r = batch.records[0]
    assert (r.query, r.trace, r.gold, r.flagged_correct) == ("custom query", TRACE, 0, False)


def test_field_map_replaces_the_aliases(tmp_path: Path) -> None:
    # `input` is present, but the mapping says the query lives under `problem_text`.
    file = write_json(tmp_path / "run.json", [record()])
    raises_naming([str(file)], str(file), "record 1", "'query'", "problem_text", field_map={"query": "problem_text"})


@pytest.mark.parametrize(
    ("value", "gold"),
    [(0, 0), (1, 1), ("0", 0), ("1", 1), ("yes", 1), ("No", 0), (" YES ", 1), (True, 1), (False, 0),
     ("true", 1), ("False", 0), ("valid", 1), ("invalid", 0), ("Invalid", 0)],
)
def test_gold_label_forms(tmp_path: Path, value: Any, gold: int) -> None:
    batch = ingest([str(write_json(tmp_path / "run.json", [record(label=value)]))])
    assert batch.records[0].gold == gold


# --- provenance ------------------------------------------------------------------------------


def test_provenance_json_records(tmp_path: Path) -> None:
    file = write_json(tmp_path / "run.json", {"results": [record(), record(), record()]})
    batch = ingest([str(file)])
    assert [r.source for r in batch.records] == [str(file)] * 3
    assert [r.locator for r in batch.records] == ["record 1", "record 2", "record 3"]
    assert batch.records[1].where == f"{file} (record 2)"


def test_provenance_jsonl_lines(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "run.jsonl", [record(), record()])
    batch = ingest([str(file)])
    assert [r.source for r in batch.records] == [str(file)] * 2
    assert [r.locator for r in batch.records] == ["line 1", "line 2"]


# --- content hash ----------------------------------------------------------------------------


def test_content_hash_same_bytes_same_hash(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_json(a / "run.json", [record()])
    write_json(b / "run.json", [record()])
    assert content_hash([str(a)]) == content_hash([str(b)])
    assert ingest([str(a)]).content_hash == content_hash([str(a)])
    assert len(content_hash([str(a)])) == 64


def test_content_hash_ignores_mtime(tmp_path: Path) -> None:
    file = write_json(tmp_path / "run.json", [record()])
    before = content_hash([str(tmp_path)])
    stat = file.stat()
    os.utime(file, (stat.st_atime + 3600, stat.st_mtime + 3600))
    assert content_hash([str(tmp_path)]) == before


def test_content_hash_changes_with_one_byte(tmp_path: Path) -> None:
    file = write_json(tmp_path / "run.json", [record()])
    before = content_hash([str(file)])
    data = bytearray(file.read_bytes())
    index = data.index(b"No")
    data[index : index + 2] = b"Na"
    file.write_bytes(bytes(data))
    assert content_hash([str(file)]) != before


def test_content_hash_covers_exactly_the_files_read(tmp_path: Path) -> None:
    write_json(tmp_path / "run1.json", [record()])
    before = content_hash([str(tmp_path)])
    (tmp_path / "readme.txt").write_text("not a result file")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    write_json(tmp_path / ".ipynb_checkpoints" / "run1-checkpoint.json", [record()])
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    assert content_hash([str(tmp_path)]) == before  # nothing read changed
    write_results(tmp_path / "2026" / "11" / "run2.JSONL", [record()])
    in_subfolder = content_hash([str(tmp_path)])
    assert in_subfolder != before
    (tmp_path / "2026" / "11" / "run2.JSONL").rename(tmp_path / "2026" / "run2.JSONL")
    assert content_hash([str(tmp_path)]) not in (before, in_subfolder)  # provenance moved with it
    assert ingest([str(tmp_path)]).content_hash == content_hash([str(tmp_path)])


# --- bad input -------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    raises_naming([str(missing)], str(missing), "no such file or directory")


def test_empty_directory(tmp_path: Path) -> None:
    folder = tmp_path / "traces"
    folder.mkdir()
    raises_naming([str(folder)], str(folder), "holds no result files", "*.json", "*.jsonl", "`traces`")


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    file = tmp_path / "run.json"
    file.write_text('[\n  {"input": "q",\n   "response": oops}\n]\n', encoding="utf-8")
    raises_naming([str(file)], str(file), "not valid JSON", "line 3", "column 16", "*.jsonl")


def test_invalid_jsonl_line_names_the_line(tmp_path: Path) -> None:
    file = tmp_path / "run.jsonl"
    file.write_text(json.dumps(record()) + "\n" + json.dumps(record()) + "\n{broken\n", encoding="utf-8")
    raises_naming([str(file)], str(file), "(line 3)", "not valid JSON")


def test_object_without_predictions_or_results(tmp_path: Path) -> None:
    file = write_json(tmp_path / "run.json", {"model": "gpt-4o", "outputs": [record()]})
    raises_naming([str(file)], str(file), "'predictions'", "'results'", "['model', 'outputs']")


def test_object_whose_list_key_is_not_a_list(tmp_path: Path) -> None:
    file = write_json(tmp_path / "run.json", {"predictions": {"0": record()}})
    raises_naming([str(file)], str(file), "'predictions'")


def test_top_level_scalar(tmp_path: Path) -> None:
    file = write_json(tmp_path / "run.json", "just a string")
    raises_naming([str(file)], str(file), "JSON list")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_record_not_an_object(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"run{suffix}"
    if suffix == ".json":
        write_json(file, [record(), ["not", "an", "object"]])
        locator = "(record 2)"
    else:
        write_jsonl(file, [record(), ["not", "an", "object"]])
        locator = "(line 2)"
    raises_naming([str(file)], str(file), locator, "expected a JSON object", "list")


@pytest.mark.parametrize(
    ("drop", "field", "aliases"),
    [
        ("input", "query", "input, query, prompt, question"),
        ("response", "trace", "response, reasoning, generated_text, output"),
        ("label", "gold", "label, ground_truth, ground_truth_label, gold"),
    ],
)
def test_missing_required_field(tmp_path: Path, drop: str, field: str, aliases: str) -> None:
    raw = record()
    del raw[drop]
    file = write_jsonl(tmp_path / "run.jsonl", [record(), raw])
    raises_naming([str(file)], str(file), "(line 2)", f"missing field {field!r}", aliases, "field_map", f"{field}: <name>")


@pytest.mark.parametrize("value", ["", "   \n  "])
def test_empty_trace(tmp_path: Path, value: str) -> None:
    file = write_json(tmp_path / "run.json", [record(response=value)])
    raises_naming([str(file)], str(file), "(record 1)", "'trace'", "non-empty text")


def test_query_that_is_not_text(tmp_path: Path) -> None:
    file = write_json(tmp_path / "run.json", [record(input=[{"role": "user", "content": "q"}])])
    raises_naming([str(file)], str(file), "(record 1)", "'query'", "non-empty text")


@pytest.mark.parametrize("value", ["maybe", 2, -1, 0.5, "", "unknown"])
def test_bad_gold_label(tmp_path: Path, value: Any) -> None:
    file = write_json(tmp_path / "run.json", [record(), record(), record(label=value)])
    raises_naming([str(file)], str(file), "(record 3)", "gold label", repr(value), "0/1, yes/no")


@pytest.mark.parametrize(("key", "value"), [("correct", "yes"), ("is_correct", 1), ("correct", "true")])
def test_non_bool_flag(tmp_path: Path, key: str, value: Any) -> None:
    file = write_jsonl(tmp_path / "run.jsonl", [record(**{key: value})])
    raises_naming([str(file)], str(file), "(line 1)", "correctness flag", "true or false", repr(value))


def test_unknown_field_map_key(tmp_path: Path) -> None:
    file = write_json(tmp_path / "run.json", [record()])
    raises_naming([str(file)], "field_map", "'qeury'", "query", field_map={"qeury": "problem_text"})


def test_the_first_bad_record_stops_ingestion(tmp_path: Path) -> None:
    folder = tmp_path / "traces"
    folder.mkdir()
    write_json(folder / "a.json", [record()])
    bad = write_jsonl(folder / "b.jsonl", [record(), record(label="perhaps")])
    raises_naming([str(folder)], str(bad), "(line 2)", "'perhaps'")


# --- regressions: bugs these tests found ------------------------------------------------------


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"], ids=["U+2028", "U+2029", "NEL"])
def test_jsonl_record_with_unicode_line_separator_in_a_string(tmp_path: Path, separator: str) -> None:
    file = tmp_path / "run.jsonl"
    rows = [record(response=f"Step one.{separator}Step two.\n\nAnswer: No"), record()]
    file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    batch = ingest([str(file)])
    assert [r.locator for r in batch.records] == ["line 1", "line 2"]
    assert separator in batch.records[0].trace


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_non_utf8_file_is_a_clear_error(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"run{suffix}"
    document: Any = [record(input="caf\u00e9")] if suffix == ".json" else record(input="caf\u00e9")
    file.write_bytes(json.dumps(document, ensure_ascii=False).encode("cp1252") + b"\n")
    raises_naming([str(file)], str(file), "UTF-8")


# --- empty inputs and the on_bad_record switch ---------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"run{suffix}"
    file.write_bytes(b"")
    raises_naming([str(file)], str(file), "the file is empty")


@pytest.mark.parametrize(("name", "content"), [("run.jsonl", "\n  \n\n"), ("run.json", "[]"), ("run.json", '{"results": []}')])
def test_file_without_records(tmp_path: Path, name: str, content: str) -> None:
    file = tmp_path / name
    file.write_text(content, encoding="utf-8")
    raises_naming([str(file)], str(file), "holds no records")


def test_directory_with_only_other_files_and_folders_names_what_it_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "traces"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    write_json(folder / ".ipynb_checkpoints" / "run-checkpoint.json", [record()])
    (folder / "run.csv").write_text("input,label\n")
    (folder / "gone.jsonl").symlink_to(folder / "nowhere.jsonl")
    raises_naming([str(folder)], str(folder), "holds no result files",
                  ".ipynb_checkpoints (hidden), gone.jsonl (dangling_link), run.csv (wrong_extension)")


def broken_jsonl(tmp_path: Path) -> Path:
    file = tmp_path / "run.jsonl"
    file.write_text(
        json.dumps(record()) + "\n" + json.dumps(record(label=1)) + "\n{broken\n" + json.dumps(record()) + "\n", encoding="utf-8"
    )
    return file


def test_broken_jsonl_line_stops_by_default(tmp_path: Path) -> None:
    file = broken_jsonl(tmp_path)
    raises_naming([str(file)], str(file), "(line 3)", "not valid JSON")
    with pytest.raises(TracesftError, match=r"\(line 3\)"):
        ingest([str(file)], on_bad_record="error")


def test_broken_jsonl_line_is_skipped_and_reported(tmp_path: Path) -> None:
    file = broken_jsonl(tmp_path)
    batch = ingest([str(file)], on_bad_record="skip")
    assert [r.locator for r in batch.records] == ["line 1", "line 2", "line 4"]
    assert [(s.source, s.locator) for s in batch.skipped] == [(str(file), "line 3")]
    assert "not valid JSON" in batch.skipped[0].error


def test_skip_covers_unreadable_records_of_every_kind(tmp_path: Path) -> None:
    json_file = write_json(tmp_path / "a.json", [record(), {"input": QUERY, "label": 0}, record(label="perhaps")])
    jsonl_file = tmp_path / "b.jsonl"
    jsonl_file.write_bytes(json.dumps(record()).encode() + b"\n" + json.dumps(record(input="caf\u00e9"), ensure_ascii=False).encode("cp1252") + b"\n")
    batch = ingest([str(json_file), str(jsonl_file)], on_bad_record="skip")
    assert [(r.source, r.locator) for r in batch.records] == [(str(json_file), "record 1"), (str(jsonl_file), "line 1")]
    reasons = {(s.source, s.locator): s.error for s in batch.skipped}
    assert "missing field 'trace'" in reasons[(str(json_file), "record 2")]
    assert "'perhaps'" in reasons[(str(json_file), "record 3")]
    assert "UTF-8" in reasons[(str(jsonl_file), "line 2")]


def test_skip_never_hides_a_broken_file(tmp_path: Path) -> None:
    file = tmp_path / "run.json"
    file.write_text("[{oops", encoding="utf-8")
    with pytest.raises(TracesftError, match="not valid JSON"):
        ingest([str(file)], on_bad_record="skip")


def test_unknown_on_bad_record_value(tmp_path: Path) -> None:
    file = write_json(tmp_path / "run.json", [record()])
    with pytest.raises(TracesftError, match="on_bad_record: 'ignore'"):
        ingest([str(file)], on_bad_record="ignore")  # type: ignore[arg-type]


def test_verify_traces_cli_reports_skipped_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tracesft.cli import main

    file = broken_jsonl(tmp_path)
    assert main(["verify-traces", str(file), "--json"]) == 2
    assert "(line 3)" in capsys.readouterr().err
    assert main(["verify-traces", str(file), "--json", "--on-bad-record", "skip"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 3
    assert set(report) >= {"records", "kept", "rejected", "skipped"}
    assert [s["where"] for s in report["skipped"]] == [f"{file} (line 3)"]
    config = tmp_path / "run.yaml"
    config.write_text(f"parameters:\n  traces: [{file}]\n  eval_set: e.csv\n  on_bad_record: skip\n", encoding="utf-8")
    assert main(["verify-traces", str(file), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable record(s) skipped" in out and f"{file} (line 3)" in out


def test_verify_traces_cli_reports_paths_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tracesft.cli import main

    write_json(tmp_path / "run.json", [record()])
    (tmp_path / "README.md").write_text("notes")
    assert main(["verify-traces", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ignored"] == [{"path": str(tmp_path / "README.md"), "reason": "wrong_extension"}]
    assert main(["verify-traces", str(tmp_path)]) == 0
    assert f"1 path(s) in the given folders not read:\n  {tmp_path / 'README.md'}: wrong_extension" in capsys.readouterr().out
