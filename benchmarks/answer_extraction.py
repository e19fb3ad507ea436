"""Answer extraction: precision and recall of `extract_answer` on a table of realistic outputs.

A misread answer costs more than a lost one: verification keeps a trace whose extracted answer
matches gold, so a wrong extraction that happens to match lets a wrong trace into training. Both
figures are therefore reported on `tests/data/answer_table.txt`, where every output carries the
verdict a careful reader takes from it:

- precision: of the outputs the extractor reads as yes/no, how many it reads correctly;
- recall: of the outputs that state a verdict, how many it reads correctly.

    python benchmarks/answer_extraction.py                  # the extractor of this checkout
    python benchmarks/answer_extraction.py --before main    # ... and the one committed at main

The table is printed, and (unless --no-record) appended to BENCHMARKS.md with the date.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # this checkout's tracesft, not an installed one

from tracesft.data.answers import extract_answer  # noqa: E402

TABLE = REPO_ROOT / "tests" / "data" / "answer_table.txt"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
ROW_HEADER = "=== "
VERDICTS = ("yes", "no", "none")


@dataclass(frozen=True)
class Row:
    id: str
    expected: str
    text: str


@dataclass(frozen=True)
class Score:
    read: int  # outputs the extractor read as yes/no
    with_verdict: int  # outputs whose expected verdict is yes/no
    correct: int  # outputs read as yes/no and equal to the expected verdict
    reversed: int  # outputs with a verdict read as the other one
    invented: int  # outputs that commit to none, read as yes/no
    misread: list[str]  # ids of rows whose extraction differs from the expected verdict


def read_table(path: Path = TABLE) -> list[Row]:
    """The rows of an answer table: `=== <verdict> <id>` headers, each followed by its output verbatim."""
    rows: list[Row] = []
    header: list[str] | None = None
    body: list[str] = []

    def close() -> None:
        if header is not None:
            rows.append(Row(id=header[1], expected=header[0], text="\n".join(body).strip("\n")))

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith(ROW_HEADER):
            close()
            header, body = line[len(ROW_HEADER) :].split(), []
            if len(header) != 2 or header[0] not in VERDICTS:
                raise ValueError(f"{path}:{number}: a row header reads '=== <yes|no|none> <id>', got {line!r}")
        elif header is not None:
            body.append(line)
    close()
    return rows


def score(extract: Callable[[str], str], rows: list[Row]) -> Score:
    answers = {row.id: extract(row.text) for row in rows}
    wrong = [row for row in rows if answers[row.id] not in ("none", row.expected)]
    return Score(
        read=sum(1 for answer in answers.values() if answer != "none"),
        with_verdict=sum(1 for row in rows if row.expected != "none"),
        correct=sum(1 for row in rows if row.expected != "none" and answers[row.id] == row.expected),
        reversed=sum(1 for row in wrong if row.expected != "none"),
        invented=sum(1 for row in wrong if row.expected == "none"),
        misread=[row.id for row in rows if answers[row.id] != row.expected],
    )


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout


def extractor_at(revision: str) -> Callable[[str], str]:
    """`extract_answer` as committed at a git revision, loaded without touching the checkout."""
    source = _git("show", f"{revision}:tracesft/data/answers.py")
    module = types.ModuleType(f"answers_at_{revision}")
    exec(compile(source, f"{revision}:tracesft/data/answers.py", "exec"), module.__dict__)
    return module.extract_answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="REV", help="also score the extractor committed at this git revision")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()

    rows = read_table()
    scores = {}
    if args.before:
        commit = _git("rev-parse", "--short", args.before).strip()
        scores[f"before ({args.before}, {commit})"] = score(extractor_at(args.before), rows)
    scores["after (this checkout)"] = score(extract_answer, rows)
    none_rows = sum(1 for row in rows if row.expected == "none")
    lines = [
        f"## Answer extraction ({date.today().isoformat()})",
        "",
        f"`python benchmarks/answer_extraction.py{' --before ' + args.before if args.before else ''}` on "
        f"`tests/data/answer_table.txt`: {len(rows)} outputs, {len(rows) - none_rows} with a verdict, "
        f"{none_rows} that commit to none. Precision: of the outputs read as yes/no, how many are read "
        "right; recall: of the outputs with a verdict, how many are read right.",
        "",
        "| extractor | precision | recall | verdict read reversed | none read as yes/no |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {name} | {s.correct}/{s.read} | {s.correct}/{s.with_verdict} | {s.reversed} | {s.invented} |"
            for name, s in scores.items()
        ),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    for name, s in scores.items():
        if s.misread:
            print(f"{name} misreads: {', '.join(s.misread)}")
    if not args.no_record:
        with BENCHMARKS_MD.open("a", encoding="utf-8") as handle:
            handle.write("\n" + report)


if __name__ == "__main__":
    main()
