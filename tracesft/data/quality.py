"""The data-quality gate: a Great Expectations 1.x suite over the verified traces.

GX is called directly (an ephemeral context over a pandas frame) rather than through ZenML's
integration, which pins GX below 1.0. The suite checks what would silently spoil a fine-tune:
schema and nulls, the label set, answers that parse and agree with gold, sequences that fit
`max_seq_length` (measured with the base model's tokenizer on the exact training text), and
duplicates. Thresholds come from `QualitySettings`.

Leakage is handled where it can be fixed: an eval problem that also appears among the traces is
removed from the eval set (evaluation excludes every problem the SFT dataset holds) and listed in
the report; the gate fails on it only when too little held-out eval data is left, which a second
suite checks on the held-out eval problems. The report is also logged to MLflow, as its own run
(see `log_report_to_mlflow`), so it is there even when the gate stops the pipeline before training.
"""

from __future__ import annotations

import html
import logging
import math
from typing import Any

import pandas as pd
from pydantic import BaseModel

from tracesft.data.answers import answer_to_label, extract_answer
from tracesft.config import QualitySettings, RegistrySettings
from tracesft.errors import TracesftError
from tracesft.evaluate.eval_set import EvalProblem
from tracesft.data.prompting import ChatTokenizer, build_completion, build_prompt
from tracesft.data.sft_dataset import normalize_query
from tracesft.data.traces import TraceBatch

COLUMNS = ["query", "trace", "gold", "answer", "answer_matches_gold", "token_length", "where"]


class ExpectationOutcome(BaseModel):
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    examples: list[str]  # provenance of a few offending records


class EvalOverlap(BaseModel):
    """An eval problem that also appears among the verified traces: removed from the eval set."""

    eval_row: int  # 0-based data row of the eval CSV
    traces: list[str]  # where it appears among the traces


class QualityReport(BaseModel):
    success: bool
    row_count: int
    outcomes: list[ExpectationOutcome]
    eval_problems: int = 0
    eval_overlap: list[EvalOverlap] = []

    @property
    def held_out_eval_problems(self) -> int:
        return self.eval_problems - len(self.eval_overlap)

    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def raise_for_failure(self) -> None:
        if self.success:
            return
        failed = self.failures()
        lines = [
            f"- {o.expectation} on {o.column or 'table'}: {o.unexpected_count} record(s), e.g. {', '.join(o.examples) or '-'}"
            for o in failed
        ]
        raise TracesftError(
            f"The data-quality gate failed {len(failed)} expectation(s) "
            f"({', '.join(sorted({o.expectation for o in failed}))}); fix or remove these records and rerun:\n"
            + "\n".join(lines)
        )


def traces_frame(batch: TraceBatch, tokenizer: Any) -> pd.DataFrame:
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
                "where": record.where,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def eval_overlap(batch: TraceBatch, eval_problems: list[EvalProblem]) -> list[EvalOverlap]:
    """Eval problems whose query (whitespace-normalised) is also the query of a verified trace."""
    where: dict[str, list[str]] = {}
    for record in batch.records:
        where.setdefault(normalize_query(record.query), []).append(record.where)
    return [
        EvalOverlap(eval_row=p.row, traces=where[normalize_query(p.query)])
        for p in eval_problems
        if normalize_query(p.query) in where
    ]


def validate_traces(
    batch: TraceBatch,
    tokenizer: ChatTokenizer,
    max_seq_length: int,
    eval_problems: list[EvalProblem],
    settings: QualitySettings | None = None,
) -> QualityReport:
    settings = settings or QualitySettings()
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # import and per-metric chatter
    import great_expectations as gx  # slow import (~3 s): only when the gate runs
    from great_expectations.data_context.types.base import ProgressBarsConfig

    overlap = eval_overlap(batch, eval_problems)
    frame = traces_frame(batch, tokenizer)
    overlapping_rows = {o.eval_row for o in overlap}
    held_out = pd.DataFrame(
        {"eval_row": [p.row for p in eval_problems if p.row not in overlapping_rows]}, columns=["eval_row"]
    )
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("traces")
    traces_batch = source.add_dataframe_asset("verified_traces").add_batch_definition_whole_dataframe("all")
    held_out_batch = source.add_dataframe_asset("held_out_eval_problems").add_batch_definition_whole_dataframe("all")
    E = gx.expectations
    suite = gx.ExpectationSuite(
        name="verified_traces",
        expectations=[
            E.ExpectTableRowCountToBeBetween(min_value=settings.min_traces),
            E.ExpectTableColumnsToMatchSet(column_set=COLUMNS, exact_match=True),
            E.ExpectColumnValuesToNotBeNull(column="query"),
            E.ExpectColumnValuesToNotBeNull(column="trace"),
            E.ExpectColumnValuesToBeInSet(column="gold", value_set=[0, 1]),
            E.ExpectColumnValuesToBeInSet(column="answer", value_set=["yes", "no"]),
            E.ExpectColumnValuesToBeInSet(column="answer_matches_gold", value_set=[True]),
            E.ExpectColumnValuesToBeBetween(
                column="token_length", min_value=1, max_value=max_seq_length, mostly=settings.within_length_share
            ),
            E.ExpectCompoundColumnsToBeUnique(column_list=["query", "trace"]),
        ],
    )
    needed = max(settings.min_held_out_eval_problems, math.ceil(settings.min_held_out_eval_share * len(eval_problems)))
    held_out_suite = gx.ExpectationSuite(
        name="held_out_eval_problems", expectations=[E.ExpectTableRowCountToBeBetween(min_value=needed)]
    )
    result = traces_batch.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite, result_format={"result_format": "COMPLETE"}
    )
    held_out_result = held_out_batch.get_batch(batch_parameters={"dataframe": held_out}).validate(held_out_suite)
    outcomes = [_outcome(r, frame) for r in result.results]
    outcomes += [_held_out_outcome(r, overlap, needed) for r in held_out_result.results]
    return QualityReport(
        success=bool(result.success and held_out_result.success),
        row_count=len(frame),
        outcomes=outcomes,
        eval_problems=len(eval_problems),
        eval_overlap=overlap,
    )


def _held_out_outcome(result: Any, overlap: list[EvalOverlap], needed: int) -> ExpectationOutcome:
    return ExpectationOutcome(
        expectation=f"{result.expectation_config.type} (held-out eval problems >= {needed})",
        column=None,
        success=bool(result.success),
        unexpected_count=0 if result.success else len(overlap),
        examples=[f"eval row {o.eval_row} is also traced in {o.traces[0]}" for o in overlap[:5]],
    )


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
    overlap = "".join(
        f"<li>eval row {o.eval_row}: also in {html.escape(', '.join(o.traces))}</li>" for o in report.eval_overlap
    )
    return (
        f"<h3>Data-quality gate {verdict} on {report.row_count} verified traces</h3>"
        "<table border='1' cellpadding='4'><tr><th>result</th><th>expectation</th><th>column</th>"
        f"<th>unexpected</th><th>examples</th></tr>{rows}</table>"
        f"<p>Eval set: {report.eval_problems} problems, {len(report.eval_overlap)} also among the traces and removed "
        f"from evaluation, {report.held_out_eval_problems} held out.</p>"
        + (f"<ul>{overlap}</ul>" if overlap else "")
    )


def log_report_to_mlflow(report: QualityReport, settings: RegistrySettings, tags: dict[str, str]) -> str:
    """Log the report as an MLflow run of its own (JSON + HTML artifacts, summary metrics); return its id.

    A run of its own, rather than a part of the training run, because the gate runs, and may stop
    the pipeline, before any training run exists; `tags` (the ZenML run's) join the two runs.
    """
    import mlflow

    from tracesft.train.tracking import mlflow_tracking

    run_name = f"data-quality {tags.get('zenml_run_name', '')}".strip()
    with (
        mlflow_tracking(settings) as experiment_id,
        mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=tags | {"tracesft.kind": "data_quality"}) as run,
    ):
        mlflow.log_metrics(
            {
                "quality_success": float(report.success),
                "verified_traces": report.row_count,
                "failed_expectations": len(report.failures()),
                "eval_overlap_removed": len(report.eval_overlap),
                "held_out_eval_problems": report.held_out_eval_problems,
            }
        )
        mlflow.log_dict(report.model_dump(), "data_quality/report.json")
        mlflow.log_text(report_html(report), "data_quality/report.html")
    return run.info.run_id
