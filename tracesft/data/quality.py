"""The data-quality gate: Great Expectations 1.x over the verified traces as a whole.

Ingestion and verification already guarantee, record by record, that every field is present and
well typed, that every kept answer parses and equals gold, that the solver confirms gold and that
no trace repeats exactly. Expectations re-checking those could not fail after them, so the gate
has none (it used to: a fixed column set, non-null query and trace, gold in {0, 1}, answer in
{yes, no}, answer equal to gold, unique query and trace). It checks what no single record shows:

- enough traces (`min_traces`), fitting `max_seq_length` as the base tokenizer counts the exact
  training text (`within_length_share`);
- the share of the valid class, label 1 (`min_valid_share`, `max_valid_share`);
- coverage: every relation template and every variable count of the eval set has traces
  (`min_traces_per_template`, `min_traces_per_variable_count`). Templates are read from the
  text with the solver's parser; Corr2Cause words parent and child alike ("X directly causes Y"),
  so those two count as one, "parent or child";
- length outliers: the share of traces over `long_trace_multiple` x the median token length;
- near-duplicate reasoning: traces equal once case, whitespace, punctuation, digits and variable
  names are normalised away (`max_near_duplicate_share`);
- no one source file dominates (`max_source_share`; skipped with a single file);
- drift from the previous accepted dataset: the valid-class share (`max_valid_share_drift`) and
  the token-length distribution (KL divergence over that dataset's quintiles,
  `max_length_kl_divergence`);
- enough held-out eval problems (below).

"The previous accepted dataset" is the newest data-quality run in the run's MLflow experiment
whose gate passed (`previous_accepted_profile`); the report it logged carries the profile the
drift checks compare against (valid share, token lengths). MLflow, where the report is logged
anyway, rather than ZenML's store: an experiment belongs to one run configuration, a ZenML store
is shared by every configuration using it. With none, the drift checks are skipped and say so.

Leakage is handled where it can be fixed: an eval problem that also appears among the traces is
removed from the eval set (evaluation excludes every problem the SFT dataset holds) and listed in
the report; the gate fails on it only when too little held-out eval data is left.

Every check reports its observed value and its bound; a failure reads `quality gate: <check>
<observed> is outside <bound> (<configuration keys>)`. GX is called directly (an ephemeral context
over pandas frames) rather than through ZenML's integration, which pins GX below 1.0. The report
is also logged to MLflow as its own run (`log_report_to_mlflow`), so it is there even when the
gate stops the pipeline before training.
"""

from __future__ import annotations

import html
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
from pydantic import BaseModel

from tracesft.config import QualitySettings, RegistrySettings
from tracesft.data.corr2cause import CHILD, PARENT, parse_problem
from tracesft.data.prompting import ChatTokenizer, build_completion, build_prompt
from tracesft.data.sft_dataset import normalize_query
from tracesft.data.traces import TraceBatch
from tracesft.errors import TracesftError
from tracesft.evaluate.eval_set import EvalProblem

REPORT_JSON = "data_quality/report.json"
_SAME_WORDING = {PARENT: "parent or child", CHILD: "parent or child"}
_LENGTH_QUANTILES = (0.2, 0.4, 0.6, 0.8)  # bin edges of the length-drift check
_VARIABLE_NAME = re.compile(r"\b[A-Z][0-9]*\b")


class CheckOutcome(BaseModel):
    """One check of the gate: what was measured, against which bound, set by which keys."""

    check: str  # what is measured, as a person reads it
    id: str  # short and stable: the MLflow metric `gate.<id>`
    expectation: str | None  # the GX expectation that decided it; None when skipped
    success: bool
    observed: int | float | None = None  # int for counts, float for shares and divergences
    minimum: int | float | None = None
    maximum: int | float | None = None
    settings: list[str]  # the configuration keys that set the bound
    detail: str = ""  # the records, strata or baseline behind the value
    skipped: str | None = None  # why the check did not run

    def bound(self) -> str:
        if self.minimum is None and self.maximum is None:
            return ""
        if self.minimum is not None and self.maximum is not None:
            return f"[{_number(self.minimum)}, {_number(self.maximum)}]"
        if self.minimum is not None:
            return f">= {_number(self.minimum)}"
        return f"<= {_number(self.maximum)}"

    def message(self) -> str:
        observed = _number(self.observed)
        if self.maximum is None:
            relation = f"is below {_number(self.minimum)}"
        elif self.minimum is None:
            relation = f"is above {_number(self.maximum)}"
        else:
            relation = f"is outside {self.bound()}"
        if observed in relation:  # rounded onto the bound: show the digits that decided it
            observed = _number(self.observed, digits=4)
        detail = f": {self.detail}" if self.detail else ""
        return f"quality gate: {self.check} {observed} {relation} ({' / '.join(self.settings)}){detail}"


class DataProfile(BaseModel):
    """What a later run's drift checks compare against."""

    traces: int
    valid_share: float | None
    token_lengths: list[int]


class Baseline(BaseModel):
    """The previous accepted dataset's profile, and where it was found."""

    profile: DataProfile
    source: str


class EvalOverlap(BaseModel):
    """An eval problem that also appears among the verified traces: removed from the eval set."""

    eval_row: int  # 0-based data row of the eval CSV, its identity in the set
    eval_line: int | None = None  # the line of the eval CSV it starts on, counted from 1: what messages show
    traces: list[str]  # where it appears among the traces


class QualityReport(BaseModel):
    success: bool
    row_count: int
    outcomes: list[CheckOutcome]
    profile: DataProfile
    baseline: str | None = None  # where the drift checks' baseline came from
    eval_problems: int = 0
    eval_overlap: list[EvalOverlap] = []

    @property
    def held_out_eval_problems(self) -> int:
        return self.eval_problems - len(self.eval_overlap)

    def failures(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if not o.success]

    def raise_for_failure(self) -> None:
        if not self.success:
            raise TracesftError("\n".join(o.message() for o in self.failures()))


def coverage_template(template: str) -> str:
    """A relation template as coverage counts it: parent and child share one wording."""
    return _SAME_WORDING.get(template, template)


def reasoning_shape(trace: str) -> str:
    """The trace with case, whitespace, punctuation, digits and variable names normalised away."""
    text = _VARIABLE_NAME.sub("v", trace).lower()
    text = re.sub(r"\d+", "0", text)
    return " ".join(re.sub(r"[^\w\s]|_", " ", text).split())


def traces_frame(batch: TraceBatch, tokenizer: Any) -> pd.DataFrame:
    """One row per verified trace, with the derived columns the checks read."""
    rows = []
    for record in batch.records:
        problem = parse_problem(record.query)  # verified traces parse: verification solved them
        prompt = build_prompt(tokenizer, record.query)
        text = prompt + build_completion(prompt, record.trace, record.gold)
        rows.append(
            {
                "gold": record.gold,
                "template": coverage_template(problem.hypothesis.template),
                "num_variables": len(problem.premise.variables),
                "token_length": len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1,  # + EOS
                "reasoning_shape": reasoning_shape(record.trace),
                "source": record.source,
                "where": record.where,
            }
        )
    columns = ["gold", "template", "num_variables", "token_length", "reasoning_shape", "source", "where"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["length_to_median"] = frame["token_length"] / frame["token_length"].median()
    return frame


def eval_overlap(batch: TraceBatch, eval_problems: list[EvalProblem]) -> list[EvalOverlap]:
    """Eval problems whose query (whitespace-normalised) is also the query of a verified trace."""
    where: dict[str, list[str]] = {}
    for record in batch.records:
        where.setdefault(normalize_query(record.query), []).append(record.where)
    return [
        EvalOverlap(eval_row=p.row, eval_line=p.line, traces=where[normalize_query(p.query)])
        for p in eval_problems
        if normalize_query(p.query) in where
    ]


def previous_accepted_profile(settings: RegistrySettings) -> Baseline | None:
    """The profile of the newest dataset the gate accepted in this MLflow experiment, if any."""
    import mlflow

    from tracesft.train.tracking import mlflow_tracking

    with mlflow_tracking(settings) as experiment_id:
        runs = mlflow.search_runs(
            experiment_ids=[experiment_id],
            filter_string="tags.`tracesft.kind` = 'data_quality' and metrics.quality_success = 1",
            order_by=["attributes.start_time DESC"],
            max_results=1,
            output_format="list",
        )
        if not runs:
            return None
        run = runs[0]
        profile = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{REPORT_JSON}").get("profile")
    if profile is None:  # logged before reports carried a profile
        return None
    return Baseline(profile=DataProfile(**profile), source=f"MLflow run {run.info.run_id} ({run.info.run_name})")


@dataclass(frozen=True)
class _Check:
    """A check before it runs: its GX expectation and how to read the result, or why it is skipped."""

    id: str
    check: str
    frame: str  # the name of the frame the expectation runs on
    expectation: Any
    settings: tuple[str, ...]
    minimum: int | float | None = None  # the bound, in the terms of the reported value
    maximum: int | float | None = None
    read: Callable[[dict], float | None] = lambda result: result.get("observed_value")
    describe: Callable[[dict], str] = lambda result: ""
    skipped: str | None = None

    def __post_init__(self) -> None:
        if self.expectation is not None:
            self.expectation.meta = {"check": self.id}  # GX returns results in its own order


def validate_traces(
    batch: TraceBatch,
    tokenizer: ChatTokenizer,
    max_seq_length: int,
    eval_problems: list[EvalProblem],
    settings: QualitySettings | None = None,
    baseline: Baseline | None = None,
) -> QualityReport:
    """Run every check on the verified traces and the eval set; `baseline` enables the drift checks."""
    settings = settings or QualitySettings()
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # import and per-metric chatter
    import great_expectations as gx  # slow import (~3 s): only when the gate runs
    from great_expectations.data_context.types.base import ProgressBarsConfig

    overlap = eval_overlap(batch, eval_problems)
    frames = _frames(traces_frame(batch, tokenizer), eval_problems, overlap)
    checks = _checks(frames, eval_problems, overlap, settings, max_seq_length, baseline, gx.expectations)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("quality_gate")
    results: dict[str, Any] = {}
    for name, frame in frames.items():
        expectations = [c.expectation for c in checks if c.frame == name and not c.skipped]
        if not expectations:
            continue
        batch_definition = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        validation = batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(
            gx.ExpectationSuite(name=name, expectations=expectations), result_format={"result_format": "COMPLETE"}
        )
        results |= {r.expectation_config.meta["check"]: r for r in validation.results}
    outcomes = [_outcome(check, None if check.skipped else results[check.id]) for check in checks]
    traces = frames["traces"]
    return QualityReport(
        success=all(o.success for o in outcomes),
        row_count=len(traces),
        outcomes=outcomes,
        profile=DataProfile(
            traces=len(traces),
            valid_share=float(traces["gold"].mean()) if len(traces) else None,
            token_lengths=[int(n) for n in traces["token_length"]],
        ),
        baseline=baseline.source if baseline else None,
        eval_problems=len(eval_problems),
        eval_overlap=overlap,
    )


def _frames(traces: pd.DataFrame, eval_problems: list[EvalProblem], overlap: list[EvalOverlap]) -> dict[str, pd.DataFrame]:
    """The traces, and the tables the coverage, source and held-out checks run on."""
    templates = pd.Series([coverage_template(p.template) for p in eval_problems], dtype=object)
    variable_counts = pd.Series([p.num_variables for p in eval_problems], dtype=int)
    sources = traces["source"].value_counts()
    traced = {o.eval_row for o in overlap}
    return {
        "traces": traces,
        "templates": _coverage(templates, traces["template"], "template"),
        "variable_counts": _coverage(variable_counts, traces["num_variables"], "num_variables"),
        "sources": pd.DataFrame({"source": sources.index, "traces": sources.values, "share": sources.values / max(len(traces), 1)}),
        "held_out": pd.DataFrame({"eval_row": [p.row for p in eval_problems if p.row not in traced]}, columns=["eval_row"]),
    }


def _coverage(eval_values: pd.Series, trace_values: pd.Series, column: str) -> pd.DataFrame:
    """Per value the eval set has: how many eval problems and how many traces have it."""
    in_eval = eval_values.value_counts()
    in_traces = trace_values.value_counts()
    return pd.DataFrame(
        {column: in_eval.index, "eval_problems": in_eval.values, "traces": [int(in_traces.get(v, 0)) for v in in_eval.index]}
    ).sort_values(column, ignore_index=True)


def _checks(
    frames: dict[str, pd.DataFrame],
    eval_problems: list[EvalProblem],
    overlap: list[EvalOverlap],
    settings: QualitySettings,
    max_seq_length: int,
    baseline: Baseline | None,
    E: Any,
) -> list[_Check]:
    traces = frames["traces"]
    where = traces["where"]
    median = float(traces["token_length"].median()) if len(traces) else 0.0
    no_traces = None if len(traces) else "no verified traces"
    needed = max(settings.min_held_out_eval_problems, math.ceil(settings.min_held_out_eval_share * len(eval_problems)))
    drift_skipped = no_traces or (
        None if baseline else "no previous accepted dataset: no data-quality run in this MLflow experiment has passed the gate"
    )

    def unexpected_share(result: dict) -> float | None:
        percent = result.get("unexpected_percent")
        return None if percent is None else percent / 100

    def records(result: dict, column: str, label: str) -> str:
        rows = result.get("unexpected_index_list") or []
        shown = ", ".join(f"{where[i]} ({traces.loc[i, column]} {label})" for i in rows[:3])
        return f"{len(rows)} trace(s), e.g. {shown}" if rows else ""

    def short_strata(frame: str, column: str, minimum: int, unit: str) -> Callable[[dict], str]:
        table = frames[frame]
        short = table[table["traces"] < minimum]
        return lambda result: ", ".join(
            f"{row[column]}{unit}: {row['traces']} traces (eval set: {row['eval_problems']})" for _, row in short.iterrows()
        )

    def near_duplicates(result: dict) -> str:
        repeats = traces[traces.duplicated("reasoning_shape", keep=False)].groupby("reasoning_shape", sort=False)["where"]
        groups = [" ≈ ".join(group.iloc[:2]) for _, group in list(repeats)[:3]]
        return f"e.g. {'; '.join(groups)}" if groups else ""

    def largest_source(result: dict) -> str:
        top = frames["sources"].iloc[0]
        return f"{top['source']} holds {top['traces']} of {len(traces)} traces"

    checks = [
        _Check(
            "traces", "verified traces", "traces",
            E.ExpectTableRowCountToBeBetween(min_value=settings.min_traces),
            ("quality.min_traces",), minimum=settings.min_traces,
        ),
        _Check(
            "within_length", f"share of traces within training.max_seq_length ({max_seq_length} tokens)", "traces",
            E.ExpectColumnValuesToBeBetween(
                column="token_length", min_value=1, max_value=max_seq_length, mostly=settings.within_length_share
            ),
            ("quality.within_length_share", "training.max_seq_length"), minimum=settings.within_length_share,
            read=lambda result: None if unexpected_share(result) is None else 1 - unexpected_share(result),
            describe=lambda result: records(result, "token_length", "tokens"), skipped=no_traces,
        ),
        _Check(
            "valid_share", "valid-class share", "traces",
            E.ExpectColumnMeanToBeBetween(column="gold", min_value=settings.min_valid_share, max_value=settings.max_valid_share),
            ("quality.min_valid_share", "quality.max_valid_share"),
            minimum=settings.min_valid_share, maximum=settings.max_valid_share, skipped=no_traces,
        ),
        _Check(
            "template_coverage", "fewest traces of an eval relation template", "templates",
            E.ExpectColumnMinToBeBetween(column="traces", min_value=settings.min_traces_per_template),
            ("quality.min_traces_per_template",), minimum=settings.min_traces_per_template,
            describe=short_strata("templates", "template", settings.min_traces_per_template, ""),
        ),
        _Check(
            "variable_count_coverage", "fewest traces of an eval variable count", "variable_counts",
            E.ExpectColumnMinToBeBetween(column="traces", min_value=settings.min_traces_per_variable_count),
            ("quality.min_traces_per_variable_count",), minimum=settings.min_traces_per_variable_count,
            describe=short_strata("variable_counts", "num_variables", settings.min_traces_per_variable_count, " variables"),
        ),
        _Check(
            "long_traces", f"share of traces over {settings.long_trace_multiple:g}x the median token length ({median:.0f})",
            "traces",
            E.ExpectColumnValuesToBeBetween(
                column="length_to_median", max_value=settings.long_trace_multiple, mostly=1 - settings.max_long_trace_share
            ),
            ("quality.max_long_trace_share", "quality.long_trace_multiple"), maximum=settings.max_long_trace_share,
            read=unexpected_share, describe=lambda result: records(result, "token_length", "tokens"), skipped=no_traces,
        ),
        _Check(
            "near_duplicates", "share of traces repeating another's normalised reasoning", "traces",
            E.ExpectColumnProportionOfUniqueValuesToBeBetween(
                column="reasoning_shape", min_value=1 - settings.max_near_duplicate_share
            ),
            ("quality.max_near_duplicate_share",), maximum=settings.max_near_duplicate_share,
            read=lambda result: 1 - result["observed_value"], describe=near_duplicates, skipped=no_traces,
        ),
        _Check(
            "source_share", "largest share of the traces from one file", "sources",
            E.ExpectColumnMaxToBeBetween(column="share", max_value=settings.max_source_share),
            ("quality.max_source_share",), maximum=settings.max_source_share, describe=largest_source,
            skipped=no_traces or (None if len(frames["sources"]) > 1 else "one source file: no other file to compare with"),
        ),
        _Check(
            "held_out_eval", "held-out eval problems", "held_out",
            E.ExpectTableRowCountToBeBetween(min_value=needed),
            ("quality.min_held_out_eval_problems", "quality.min_held_out_eval_share"), minimum=needed,
            describe=lambda result: "; ".join(f"eval set {_eval_position(o)} is also traced in {o.traces[0]}" for o in overlap[:5]),
        ),
    ]
    if drift_skipped:
        return checks + [
            _Check("valid_share_drift", "valid-class share against the previous accepted dataset", "traces", None,
                   ("quality.max_valid_share_drift",), skipped=drift_skipped),
            _Check("length_drift", "token-length KL divergence from the previous accepted dataset", "traces", None,
                   ("quality.max_length_kl_divergence",), skipped=drift_skipped),
        ]
    previous = baseline.profile
    low = max(0.0, previous.valid_share - settings.max_valid_share_drift)
    high = min(1.0, previous.valid_share + settings.max_valid_share_drift)
    previous_median = float(np.median(previous.token_lengths))
    return checks + [
        _Check(
            "valid_share_drift", "valid-class share against the previous accepted dataset", "traces",
            E.ExpectColumnMeanToBeBetween(column="gold", min_value=low, max_value=high),
            ("quality.max_valid_share_drift",), minimum=low, maximum=high,
            describe=lambda result: f"previous accepted dataset {previous.valid_share:.2f} ({baseline.source})",
        ),
        _Check(
            "length_drift", "token-length KL divergence from the previous accepted dataset", "traces",
            E.ExpectColumnKLDivergenceToBeLessThan(
                column="token_length", partition_object=_length_partition(previous.token_lengths),
                threshold=settings.max_length_kl_divergence,
            ),
            ("quality.max_length_kl_divergence",), maximum=settings.max_length_kl_divergence,
            describe=lambda result: (
                f"median token length {median:.0f}, previous accepted dataset {previous_median:.0f} ({baseline.source})"
            ),
        ),
    ]


def _length_partition(lengths: list[int]) -> dict[str, list[float]]:
    """The previous lengths' histogram over their quintiles, open-ended, for GX's KL divergence.

    Each bin's weight gets half a trace added, so no bin is empty: a length the previous dataset
    never had then costs a finite, large divergence rather than an infinite one.
    """
    edges = sorted({float(q) for q in np.quantile(lengths, _LENGTH_QUANTILES)})
    bins = [-math.inf, *edges, math.inf]
    counts = np.histogram(lengths, bins)[0] + 0.5
    return {"bins": bins, "weights": [float(w) for w in counts / counts.sum()]}


def _outcome(check: _Check, result: Any) -> CheckOutcome:
    fields = {
        "check": check.check, "id": check.id, "settings": list(check.settings),
        "minimum": check.minimum, "maximum": check.maximum,
    }
    if result is None:
        return CheckOutcome(**fields, expectation=None, success=True, skipped=check.skipped)
    details = result.result or {}
    observed = check.read(details)
    return CheckOutcome(
        **fields,
        expectation=result.expectation_config.type,
        success=bool(result.success),
        observed=observed.item() if isinstance(observed, np.generic) else observed,
        detail=check.describe(details) if not result.success else "",
    )


def _eval_position(overlap: EvalOverlap) -> str:
    """Where an eval problem sits, as an editor shows it (docs/architecture.md, "Positions in files")."""
    return f"line {overlap.eval_line}" if overlap.eval_line is not None else f"row {overlap.eval_row + 1}"


def _number(value: int | float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def report_html(report: QualityReport) -> str:
    """The report as an HTML table, every check with its observed value and bound (ZenML, MLflow)."""

    def row(o: CheckOutcome) -> str:
        verdict, colour = ("skipped", "#5f6368") if o.skipped else ("pass", "#137333") if o.success else ("FAIL", "#b3261e")
        observed = "-" if o.skipped else _number(o.observed, digits=3)
        cells = [verdict, o.check, observed, o.bound(), ", ".join(o.settings), o.expectation or "", o.skipped or o.detail]
        return f"<tr style='color:{colour}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"

    verdict = "passed" if report.success else "FAILED"
    overlap = "".join(
        f"<li>eval set {_eval_position(o)}: also in {html.escape(', '.join(o.traces))}</li>" for o in report.eval_overlap
    )
    baseline = html.escape(report.baseline) if report.baseline else "none (drift checks skipped)"
    return (
        f"<h3>Data-quality gate {verdict} on {report.row_count} verified traces</h3>"
        "<table border='1' cellpadding='4'><tr><th>result</th><th>check</th><th>observed</th><th>bound</th>"
        f"<th>setting</th><th>GX expectation</th><th>detail</th></tr>{''.join(row(o) for o in report.outcomes)}</table>"
        f"<p>Drift baseline: {baseline}.</p>"
        f"<p>Eval set: {report.eval_problems} problems, {len(report.eval_overlap)} also among the traces and removed "
        f"from evaluation, {report.held_out_eval_problems} held out.</p>"
        + (f"<ul>{overlap}</ul>" if overlap else "")
    )


def log_report_to_mlflow(report: QualityReport, settings: RegistrySettings, tags: dict[str, str]) -> str:
    """Log the report as an MLflow run of its own (JSON + HTML artifacts, every check's value); return its id.

    A run of its own, rather than a part of the training run, because the gate runs, and may stop
    the pipeline, before any training run exists; `tags` (the ZenML run's) join the two runs. A
    passing run's JSON is what `previous_accepted_profile` reads back as the next drift baseline.
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
                "failed_checks": len(report.failures()),
                "eval_overlap_removed": len(report.eval_overlap),
                "held_out_eval_problems": report.held_out_eval_problems,
            }
            | {f"gate.{o.id}": o.observed for o in report.outcomes if o.observed is not None}
        )
        mlflow.log_dict(report.model_dump(), REPORT_JSON)
        mlflow.log_text(report_html(report), "data_quality/report.html")
    return run.info.run_id
