"""Every input a new user gets wrong gets one line that names it and says what to do: exit 2,
`error: …` on stderr, never a traceback. The cases are the ones new users ran into."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from tracesft.cli import main
from tracesft.config import RegistrySettings
from tracesft.errors import TracesftError
from tracesft.user_paths import require_new_folder

HEADER = "input,label,num_variables,template\n"
# One problem the exact solver agrees with (gold 0: A and B are independent).
QUERY = (
    "Premise: Suppose there is a closed system of 2 variables, A and B. All the statistical relations among "
    "these 2 variables are as follows: A is independent of B.\nHypothesis: A directly causes B."
)
CSV_TEXT = HEADER + f'"{QUERY}",0,2,parent\n'


def assert_one_clear_line(capsys: pytest.CaptureFixture, argv: list[str], *parts: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, f"{part!r} not in {err!r}"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _loop(path: Path) -> Path:
    path.symlink_to(path.name)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


# Each case makes a bad file at the path it is given and names what the message must say.
BAD_CSVS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "utf16": (lambda p: _write(p, CSV_TEXT.encode("utf-16")), ("is UTF-16 text", "UTF-8")),
    "utf16-without-bom": (lambda p: _write(p, CSV_TEXT.encode("utf-16-le")), ("(line 1)", "NUL", "UTF-8")),
    "cp1252": (
        lambda p: _write(p, (HEADER + '"Premise: caf\u00e9",0,3,parent\n').encode("cp1252")),
        ("(line 2, byte 48)", "not UTF-8", "re-save it as UTF-8"),
    ),
    "folder": (_folder, ("a folder, not a file", "eval set")),
    "symlink-loop": (_loop, ("symbolic link that loops",)),
    "field-over-128KiB": (
        lambda p: _write(p, (HEADER + f'"{QUERY}",0,2,parent\n"' + "x" * 140_000 + '",0,2,parent\n').encode()),
        ("(line 4)", "field limit", "quote"),
    ),
    "missing": (lambda p: p, ("eval set not found",)),
}


@pytest.mark.parametrize("command", ["solve", "score"])
@pytest.mark.parametrize("case", BAD_CSVS)
def test_a_bad_csv_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, command: str, case: str) -> None:
    make, parts = BAD_CSVS[case]
    csv_path = make(tmp_path / "problems.csv")
    predictions = _write(tmp_path / "p.jsonl", json.dumps({"input": QUERY, "output": "No"}).encode() + b"\n")
    argv = ["solve", str(csv_path)] if command == "solve" else ["score", "--gold", str(csv_path), "--predictions", str(predictions)]
    assert_one_clear_line(capsys, argv, str(csv_path), *parts)


BAD_PREDICTIONS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "utf16": (lambda p: _write(p, json.dumps({"input": QUERY, "output": "No"}).encode("utf-16")), ("is UTF-16 text",)),
    "folder": (_folder, ("a folder, not a file", "predictions file")),
    "symlink-loop": (_loop, ("symbolic link that loops",)),
}


@pytest.mark.parametrize("case", BAD_PREDICTIONS)
def test_a_bad_predictions_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    make, parts = BAD_PREDICTIONS[case]
    predictions = make(tmp_path / "p.jsonl")
    gold = _write(tmp_path / "gold.csv", CSV_TEXT.encode())
    assert_one_clear_line(capsys, ["score", "--gold", str(gold), "--predictions", str(predictions)], str(predictions), *parts)


def test_a_utf8_csv_with_a_byte_order_mark_is_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gold = _write(tmp_path / "gold.csv", CSV_TEXT.encode("utf-8-sig"))
    assert main(["solve", str(gold), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["agree"] == 1


def test_line_separators_inside_a_jsonl_string_do_not_split_the_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # json.dumps leaves these unescaped with ensure_ascii=False; str.splitlines() would break at each.
    output = "<think>A and B\u2028are\u2029independent\x1c\x1d\x1e\x85</think>\nAnswer: No"
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"input": QUERY, "output": output}, ensure_ascii=False) + "\n", encoding="utf-8")
    gold = _write(tmp_path / "gold.csv", CSV_TEXT.encode())
    assert main(["score", "--gold", str(gold), "--predictions", str(predictions), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0


def _non_empty_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


EXISTING_OUTPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "file": (lambda p: _write(p, b"a model"), "not a folder"),
    "non-empty-folder": (_non_empty_folder, "not empty"),
}


@pytest.mark.parametrize("case", EXISTING_OUTPUTS)
def test_tiny_model_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    make, part = EXISTING_OUTPUTS[case]
    out = make(tmp_path / "model")
    assert_one_clear_line(capsys, ["tiny-model", str(out)], str(out), part, "new or empty folder")
    kept = out if out.is_file() else out / "config.json"
    assert kept.read_bytes() in (b"a model", b"{}")


@pytest.mark.parametrize("case", EXISTING_OUTPUTS)
def test_merged_export_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    make, part = EXISTING_OUTPUTS[case]
    out = make(tmp_path / "merged")
    # Refused before the registry is asked for the adapter: nothing is downloaded or merged.
    assert_one_clear_line(capsys, ["adapters", "export", "champion", "--merged", str(out)], str(out), part)


def test_require_new_folder_accepts_only_absent_or_empty(tmp_path: Path) -> None:
    require_new_folder(tmp_path / "absent", "model")
    require_new_folder(_folder(tmp_path / "empty"), "model")
    (tmp_path / "dangling").symlink_to("nowhere")
    for taken in (tmp_path / "dangling", _write(tmp_path / "file", b""), _non_empty_folder(tmp_path / "full")):
        with pytest.raises(TracesftError, match=str(taken)):
            require_new_folder(taken, "model")


# What MLflow's registry refuses (mlflow.utils.validation._validate_model_name), and a few it accepts.
MODEL_NAMES = ["team/corr2cause", "a:b", "", "   ", ".", "..", "..x", "corr2cause-r1-lora", "x.y", "a b", "v..2"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registry_model_name_is_checked_as_mlflow_would(name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
        mlflow_accepts = True
    except MlflowException:
        mlflow_accepts = False
    try:
        RegistrySettings(model_name=name)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == mlflow_accepts


def test_a_bad_model_name_fails_as_the_configuration_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("parameters:\n  traces: [t]\n  eval_set: e.csv\n  registry:\n    model_name: team/corr2cause\n")
    assert_one_clear_line(capsys, ["adapters", "list", "--config", str(config)], str(config),
                          "parameters.registry.model_name", "'/'")


def test_retrain_on_a_path_that_does_not_exist_says_what_it_takes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "gpt-results"
    assert_one_clear_line(capsys, ["retrain", "--traces", str(missing)], str(missing), "no such file or folder",
                          "(or one such file)")
