"""The data-quality gate: a Great Expectations 1.x suite over the verified traces.

GX is called directly (an ephemeral context over a pandas frame) rather than through ZenML's
integration, which pins GX below 1.0. The suite checks what would silently spoil a fine-tune:
schema and nulls, the label set, answers that parse and agree with gold, sequences that fit
`max_seq_length` (measured with the base model's tokenizer on the exact training text),
duplicates, and leakage of eval problems into training.
"""

from __future__ import annotations

import html
import logging
from typing import Any

import pandas as pd
from pydantic import BaseModel

from tracesft.answers import answer_to_label, extract_answer
from tracesft.errors import TracesftError
from tracesft.prompting import ChatTokenizer, build_completion, build_prompt
from tracesft.sft_dataset import normalize_query
from tracesft.traces import TraceBatch

COLUMNS = ["query", "trace", "gold", "answer", "answer_matches_gold", "token_length", "in_eval_set", "where"]


class ExpectationOutcome(BaseModel):
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    examples: list[str]  # provenance of a few offending records


class QualityReport(BaseModel):
    success: bool
    row_count: int
    outcomes: list[ExpectationOutcome]

    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def raise_for_failure(self) -> None:
        if self.success:
            return
        lines = [
            f"- {o.expectation} on {o.column or 'table'}: {o.unexpected_count} record(s), e.g. {', '.join(o.examples) or '-'}"
            for o in self.failures()
        ]
        raise TracesftError(
            "The verified traces failed the data-quality gate; fix or remove these records and rerun:\n"
            + "\n".join(lines)
        )


def traces_frame(batch: TraceBatch, tokenizer: Any, eval_queries: set[str]) -> pd.DataFrame:
    """One row per record, with the derived columns the suite checks."""
    rows = []
    for record in batch.records:
        answer = extract_answer(record.trace)
        prompt = build_prompt(tokenizer, record.query)
        text = prompt + build_completion(prompt, record.trace, record.gold)
        rows.append(
            {
                "query": record.query,
                "trace": record.trace,
                "gold": record.gold,
                "answer": answer,
                "answer_matches_gold": answer_to_label(answer) == record.gold,
                "token_length": len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1,  # + EOS
                "in_eval_set": normalize_query(record.query) in eval_queries,
                "where": record.where,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def validate_traces(batch: TraceBatch, tokenizer: ChatTokenizer, max_seq_length: int, eval_queries: set[str]) -> QualityReport:
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # import and per-metric chatter
    import great_expectations as gx  # slow import (~3 s): only when the gate runs
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = traces_frame(batch, tokenizer, eval_queries)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas("traces")
        .add_dataframe_asset("verified_traces")
        .add_batch_definition_whole_dataframe("all")
    )
    E = gx.expectations
    suite = gx.ExpectationSuite(
        name="verified_traces",
        expectations=[
            E.ExpectTableRowCountToBeBetween(min_value=1),
            E.ExpectTableColumnsToMatchSet(column_set=COLUMNS, exact_match=True),
            E.ExpectColumnValuesToNotBeNull(column="query"),
            E.ExpectColumnValuesToNotBeNull(column="trace"),
            E.ExpectColumnValuesToBeInSet(column="gold", value_set=[0, 1]),
            E.ExpectColumnValuesToBeInSet(column="answer", value_set=["yes", "no"]),
            E.ExpectColumnValuesToBeInSet(column="answer_matches_gold", value_set=[True]),
            E.ExpectColumnValuesToBeBetween(column="token_length", min_value=1, max_value=max_seq_length),
            E.ExpectCompoundColumnsToBeUnique(column_list=["query", "trace"]),
            E.ExpectColumnValuesToBeInSet(column="in_eval_set", value_set=[False]),
        ],
    )
    result = batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite, result_format={"result_format": "COMPLETE"}
    )
    outcomes = [_outcome(r, frame) for r in result.results]
    return QualityReport(success=bool(result.success), row_count=len(frame), outcomes=outcomes)


def _outcome(result: Any, frame: pd.DataFrame) -> ExpectationOutcome:
    config = result.expectation_config
    details = result.result or {}
    indices = details.get("unexpected_index_list") or []
    examples = [str(frame.loc[i, "where"]) for i in indices[:5] if isinstance(i, int) and i in frame.index]
    return ExpectationOutcome(
        expectation=config.type,
        column=config.kwargs.get("column") or ", ".join(config.kwargs.get("column_list") or []) or None,
        success=bool(result.success),
        unexpected_count=int(details.get("unexpected_count") or 0),
        examples=examples,
    )


def report_html(report: QualityReport) -> str:
    """The report as a small HTML table, shown as the artifact's visualization in ZenML."""
    rows = "".join(
        f"<tr style='color:{'#137333' if o.success else '#b3261e'}'><td>{'pass' if o.success else 'FAIL'}</td>"
        f"<td>{html.escape(o.expectation)}</td><td>{html.escape(o.column or '')}</td><td>{o.unexpected_count}</td>"
        f"<td>{html.escape('; '.join(o.examples))}</td></tr>"
        for o in report.outcomes
    )
    verdict = "passed" if report.success else "FAILED"
    return (
        f"<h3>Data-quality gate {verdict} on {report.row_count} verified traces</h3>"
        "<table border='1' cellpadding='4'><tr><th>result</th><th>expectation</th><th>column</th>"
        f"<th>unexpected</th><th>examples</th></tr>{rows}</table>"
    )
