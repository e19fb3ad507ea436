"""The evaluation as a person reads it: HTML tables and a plot, for ZenML and MLflow alike.

One page holds the headline (F1 of both models and the confidence interval of their difference),
every metric on every set (eval set, renamed variables, validation split), the breakdowns by
template and by number of variables, the confusion matrices (each a table beside its picture), and a bar chart of F1 by template.
The charts are drawn once (`evaluation_figure`) and embedded in the page as a PNG, so the ZenML
dashboard and MLflow show the same picture. It is a bare `matplotlib.figure.Figure`, not a pyplot
figure: it renders to PNG without a display, so no backend is chosen for the whole process, and
nothing needs closing.
"""

from __future__ import annotations

import base64
import html
import io

from matplotlib.figure import Figure

from tracesft.evaluate.comparison import ModelComparison
from tracesft.evaluate.evaluation import EvalReport
from tracesft.evaluate.metrics import Scores

_METRICS = ("n", "f1", "precision", "recall", "accuracy", "parse_failure_rate")
_STYLE = (
    "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:0.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}th:first-child,td:first-child{text-align:left}"
    "th{background:#f3f3f3}.win{color:#0a7d27}.loss{color:#b00020}</style>"
)


def evaluation_figure(base: EvalReport, tuned: EvalReport) -> Figure:
    """F1 by template (and overall, and with renamed variables), base beside fine-tuned."""
    groups = ["all", *sorted(set(base.scores.by_template) | set(tuned.scores.by_template))]
    if base.renamed is not None and tuned.renamed is not None:
        groups.append("all, renamed")

    def f1(report: EvalReport, group: str) -> float:
        if group == "all":
            return report.scores.f1
        if group == "all, renamed":
            return report.renamed.scores.f1 if report.renamed else 0.0
        found = report.scores.by_template.get(group)
        return found.f1 if found else 0.0

    figure = Figure(figsize=(max(6.0, 1.1 * len(groups)), 3.6), layout="constrained")
    axes = figure.subplots()
    width = 0.4
    for offset, report, color in ((-width / 2, base, "#9aa5b1"), (width / 2, tuned, "#1f6feb")):
        axes.bar([i + offset for i in range(len(groups))], [f1(report, g) for g in groups], width, label=report.model, color=color)
    axes.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("F1 (valid class)")
    axes.set_title("Corr2Cause F1 by relation template")
    axes.legend()
    return figure


def confusion_figure(report: EvalReport) -> Figure:
    """One model's confusion matrix on the eval set as a shaded 2 x 2 grid, counts written in."""
    c = report.scores.confusion
    counts = [[c["tp"], c["fn"]], [c["fp"], c["tn"]]]
    figure = Figure(figsize=(2.8, 2.4), layout="constrained")
    axes = figure.subplots()
    axes.imshow(counts, cmap="Blues", vmin=0, vmax=max(1, max(map(max, counts))))
    for row, values in enumerate(counts):
        for column, value in enumerate(values):
            axes.text(column, row, str(value), ha="center", va="center", fontsize=12,
                      color="white" if value > max(map(max, counts)) / 2 else "black")
    axes.set_xticks([0, 1], ["valid", "not valid"])
    axes.set_yticks([0, 1], ["valid", "not valid"])
    axes.set_xlabel("predicted")
    axes.set_ylabel("gold")
    axes.set_title(report.model)
    return figure


def figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def render_evaluation_html(base: EvalReport, tuned: EvalReport, comparison: ModelComparison) -> str:
    interval = comparison.f1_difference
    verdict = "win" if interval.low > 0 else "loss" if interval.high < 0 else ""
    parts = [
        f"<html><head><meta charset='utf-8'>{_STYLE}</head><body>",
        "<h2>Corr2Cause evaluation: base vs fine-tuned</h2>",
        f"<p>{comparison.problems} problems. F1 base {comparison.base_f1:.3f}, fine-tuned {comparison.finetuned_f1:.3f}. "
        f"<b class='{verdict}'>F1 difference {interval.observed:+.3f}</b>, "
        f"{interval.confidence:.0%} paired bootstrap interval [{interval.low:+.3f}, {interval.high:+.3f}] "
        f"({interval.n_resamples} resamples).</p>",
        _image("F1 by template", evaluation_figure(base, tuned)),
        "<h3>All sets</h3>",
        _table(
            ["model", "set", *_METRICS, "robustness F1 drop"],
            [
                [report.model, name, *_cells(scores), _number(report.robustness_f1_drop) if name == "eval set" else ""]
                for report in (base, tuned)
                for name, scores in _sets(report)
            ],
        ),
    ]
    for title, attribute in (("By relation template", "by_template"), ("By number of variables", "by_num_variables")):
        keys = sorted(set(getattr(base.scores, attribute)) | set(getattr(tuned.scores, attribute)))
        rows = [
            [key, report.model, *_cells(getattr(report.scores, attribute)[key])]
            for key in keys
            for report in (base, tuned)
            if key in getattr(report.scores, attribute)
        ]
        parts += [f"<h3>{title} (eval set)</h3>", _table(["group", "model", *_METRICS], rows)]
    parts.append("<h3>Confusion matrices (eval set; unparseable answers count as &quot;not valid&quot;)</h3>")
    for report in (base, tuned):
        c = report.scores.confusion
        table = _table(
            [report.model, "predicted valid", "predicted not valid"],
            [["gold valid", str(c["tp"]), str(c["fn"])], ["gold not valid", str(c["fp"]), str(c["tn"])]],
        )
        # The table and its picture side by side: the numbers to quote, the shading to see at a glance.
        parts.append(f"<div style='display:flex;gap:2em;align-items:center'>{table}"
                     f"{_image(f'confusion matrix, {report.model}', confusion_figure(report))}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _image(alt: str, figure: Figure) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(figure_png(figure)).decode()}'>"


def _sets(report: EvalReport) -> list[tuple[str, Scores]]:
    sets: list[tuple[str, Scores]] = [("eval set", report.scores)]
    if report.renamed is not None:
        sets.append(("renamed variables", report.renamed.scores))
    if report.validation is not None:
        sets.append(("validation split", report.validation.scores))
    return sets


def _cells(scores: Scores) -> list[str]:
    return [str(scores.n)] + [_number(getattr(scores, name)) for name in _METRICS[1:]]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
