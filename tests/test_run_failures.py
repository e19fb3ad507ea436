"""A pipeline run that fails because of its input reads like help, as a user sees it in a terminal.

`tracesft retrain` runs in a process of its own, so what is counted is everything it printed:
ZenML's progress lines on stderr, then one `error:` message naming the step, the file and the
line, and what to do; no traceback (that needs `--debug`); exit code 2; with `--json` stdout is
one JSON document saying so, and nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tracesft.config import embedded_config_path, embedded_grpo_config_path
from tracesft.workspace import prepare_demo_workspace

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run-failures")
    prepare_demo_workspace(root / ".tracesft")
    return root


def config(root: Path, **parameters: str) -> Path:
    document = yaml.safe_load(embedded_config_path().read_text())
    document["parameters"] |= {
        "eval_set": str(root / ".tracesft" / "eval" / "corr2cause_eval.csv"),
        "base_model": str(root / ".tracesft" / "tiny-model"),
        **parameters,
    }
    document["parameters"]["registry"] |= {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    path = root / f"run-{len(list(root.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def retrain(root: Path, traces: Path, run_config: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "tracesft"), "retrain", "--traces", str(traces), "--config", str(run_config)]
    return subprocess.run([*command, *flags], cwd=root, capture_output=True, text=True, check=False)


def test_a_malformed_trace_file_is_one_message_naming_file_and_line(root: Path) -> None:
    traces = root / "malformed"
    traces.mkdir()
    good = next((root / ".tracesft" / "traces").glob("*.jsonl")).read_text(encoding="utf-8").splitlines()[:3]
    bad = traces / "gpt_run.jsonl"
    bad.write_text("\n".join(good) + "\n{not json\n", encoding="utf-8")

    done = retrain(root, traces, config(root))

    printed = done.stdout + done.stderr
    assert done.returncode == 2, printed
    assert len(printed.splitlines()) < 20, printed
    assert "Traceback" not in printed
    assert done.stdout == ""  # the result goes to stdout; there is none
    assert done.stderr.splitlines()[-1] == (
        f"error: step ingest_traces: {bad} (line 4): not valid JSON (Expecting property name enclosed in double quotes); "
        "fix or remove the line."
    )


def test_an_eval_set_that_is_a_folder_is_one_message_and_json_says_so(root: Path) -> None:
    folder = root / "eval-folder"
    folder.mkdir()

    done = retrain(root, root / ".tracesft" / "traces", config(root, eval_set=str(folder)), "--json")

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) < 20, done.stderr
    [message] = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert str(folder) in message and "folder" in message
    report = json.loads(done.stdout)  # exactly one JSON document, nothing else
    assert report["status"] == "failed" and report["error"] == message.removeprefix("error: ")


def test_grpo_with_no_version_to_continue_is_one_message_and_json_says_so(root: Path) -> None:
    """`tracesft grpo` reports through the same path as the SFT commands: a parent the registry
    does not hold is one `error:` line naming the setting, exit 2, and one JSON document."""
    document = yaml.safe_load(embedded_grpo_config_path().read_text())
    document["parameters"] |= {"parent": "champion", "eval_set": str(root / ".tracesft" / "eval" / "corr2cause_eval.csv"),
                               "base_model": str(root / ".tracesft" / "tiny-model")}
    document["parameters"]["registry"] |= {"tracking_uri": f"sqlite:///{root / 'grpo-mlflow.db'}"}
    grpo_config = root / "grpo.yaml"
    grpo_config.write_text(yaml.safe_dump(document))

    done = subprocess.run([str(Path(sys.executable).parent / "tracesft"), "grpo", "--config", str(grpo_config), "--json"],
                          cwd=root, capture_output=True, text=True, check=False)

    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) < 20, done.stderr
    [message] = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "champion" in message, message
    report = json.loads(done.stdout)  # exactly one JSON document, nothing else
    assert report["status"] == "failed" and report["error"] == message.removeprefix("error: ")
