"""The repository documents itself: no file cites a document outside it, and the paths the
README and docs/architecture.md name exist.

The team's private notes and the folder beside the checkout are not shipped with the repository,
so a reader of the code must never be sent there; docs/architecture.md (and BENCHMARKS.md for
measurements) is where such facts live.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/architecture.md")

# Built from parts so that this file does not match its own patterns.
FORBIDDEN = ("DESIGN" + ".md", ".." + "/shared")

# Files another change is rewriting; each drops its citation there. Remove the entry once it has.

# A path into the library as prose writes it: `tracesft/data/solver.py`, not `.tracesft/...`.
LIBRARY_PATH = re.compile(r"(?<![\w./-])tracesft/[\w/]+\.py\b")


def _repository_files() -> list[str]:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: the repository's files are unknown")
    listing = subprocess.run(
        # Tracked, and new files not yet added (but not ignored ones such as .venv/).
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode()
    return [name for name in listing.split("\0") if name]


def test_no_file_cites_outside_the_repository() -> None:
    offenders = []
    for name in _repository_files():
        path = REPO_ROOT / name
        if not path.is_file():
            continue  # deleted in the working tree and not yet committed
        text = path.read_bytes().decode("utf-8", errors="ignore")
        for number, line in enumerate(text.splitlines(), start=1):
            if any(pattern in line for pattern in FORBIDDEN):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, (
        "cite docs/architecture.md (or BENCHMARKS.md for measurements) instead of files outside "
        "the repository:\n" + "\n".join(offenders)
    )


@pytest.mark.parametrize("document", DOCUMENTS)
def test_library_paths_in_the_documents_exist(document: str) -> None:
    text = (REPO_ROOT / document).read_text(encoding="utf-8")
    named = sorted(set(LIBRARY_PATH.findall(text)))
    assert named, f"{document} names no tracesft/...py path; is the pattern still right?"
    missing = [path for path in named if not (REPO_ROOT / path).is_file()]
    assert not missing, f"{document} names files that do not exist: {missing}"


def test_the_pattern_finds_what_it_should() -> None:
    text = "see `tracesft/data/solver.py`, (tracesft/cli.py) and .tracesft/zenml/x.py, not a/tracesft/y.py"
    assert LIBRARY_PATH.findall(text) == ["tracesft/data/solver.py", "tracesft/cli.py"]


def test_the_readme_shows_the_demo_summary_as_the_demo_prints_it() -> None:
    """The example summary counts the pipeline's real steps, and its "Look next" commands are the
    ones a run prints after `make demo` (venv not activated: `.venv/bin/...`)."""
    import steps

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    steps_shown = re.search(r"completed, 0 of (\d+) steps cached\.", readme)
    assert steps_shown, "README.md shows no run summary"
    body = (REPO_ROOT / "pipelines" / "sft_pipeline.py").read_text(encoding="utf-8").split("def sft_pipeline(")[1]
    invocations = sum(len(re.findall(rf"\b{name}\(", body)) for name in steps.__all__)
    assert int(steps_shown[1]) == invocations, "the README's example summary must count the pipeline's steps"
    for command in (".venv/bin/tracesft adapters list", ".venv/bin/mlflow ui --backend-store-uri sqlite:///",
                    ".venv/bin/zenml pipeline runs list", ".venv/bin/tracesft adapters show champion"):
        assert command in readme, command


def test_a_run_points_at_commands_that_run_where_the_user_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Outside an activated venv the summary names `.venv/bin/tracesft`; inside one, `tracesft`."""
    import sys

    from tracesft.cli import _runnable

    monkeypatch.chdir(Path(sys.executable).parent.parent.parent)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _runnable("tracesft") == str(Path(sys.executable).parent.relative_to(Path.cwd()) / "tracesft")
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert _runnable("tracesft") == "tracesft"
