"""`extract_answer` against a table of realistic model outputs (`tests/data/answer_table.txt`).

Every row must read as its expected verdict, which is precision and recall of 100% on the table:
a row read as the wrong answer (or read where the output commits to none) would let a wrong trace
into training; a row read as "none" would lose a good one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.answer_extraction import VERDICTS, read_table, score
from tracesft.data.answers import extract_answer

ROWS = read_table()


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_every_row_reads_as_its_verdict(row) -> None:
    assert extract_answer(row.text) == row.expected


def test_the_table_covers_both_kinds_of_error() -> None:
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    counts = {verdict: sum(1 for row in ROWS if row.expected == verdict) for verdict in VERDICTS}
    assert len(ROWS) >= 80 and counts["none"] >= 20 and counts["yes"] >= 20 and counts["no"] >= 20, counts
    assert all(row.text for row in ROWS)


def test_score_counts_precision_and_recall(tmp_path: Path) -> None:
    table = tmp_path / "table.txt"
    table.write_text("# comment\n=== yes a\nAnswer: Yes\n=== no b\n\nAnswer: No\n\n=== none c\nmaybe\n", encoding="utf-8")
    rows = read_table(table)
    assert [(row.id, row.expected, row.text) for row in rows] == [
        ("a", "yes", "Answer: Yes"),
        ("b", "no", "Answer: No"),
        ("c", "none", "maybe"),
    ]
    always_yes = score(lambda text: "yes", rows)
    assert (always_yes.correct, always_yes.read, always_yes.with_verdict) == (1, 3, 2)
    assert (always_yes.reversed, always_yes.invented, always_yes.misread) == (1, 1, ["b", "c"])


def test_a_malformed_header_names_its_line(tmp_path: Path) -> None:
    table = tmp_path / "table.txt"
    table.write_text("=== yes a\nAnswer: Yes\n=== maybe b\ntext\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"table\.txt:3: .*'=== <yes\|no\|none> <id>'"):
        read_table(table)
