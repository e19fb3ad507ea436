from typing import Annotated

from zenml import log_metadata, step
from zenml.types import HTMLString

from tracesft.eval_set import load_eval_set
from tracesft.modeling import load_tokenizer
from tracesft.quality import QualityReport, report_html, validate_traces as run_suite
from tracesft.sft_dataset import normalize_query
from tracesft.traces import TraceBatch


@step
def validate_traces(
    verified: TraceBatch, base_model: str, base_model_revision: str | None, max_seq_length: int, eval_set: str
) -> tuple[Annotated[QualityReport, "data_quality_report"], Annotated[HTMLString, "data_quality_view"]]:
    """Run the Great Expectations suite; the dataset step refuses to build on a failed report."""
    tokenizer = load_tokenizer(base_model, base_model_revision)
    eval_queries = {normalize_query(p.query) for p in load_eval_set(eval_set)}
    report = run_suite(verified, tokenizer, max_seq_length, eval_queries)
    log_metadata({"success": report.success, "failed_expectations": len(report.failures())})
    return report, HTMLString(report_html(report))
