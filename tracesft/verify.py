"""Keep a trace only when its own text proves it right.

The harness's `correct` flag is not evidence: the answer is read from the trace itself and must
match the gold label, and a flag that disagrees with the text marks the record as untrustworthy.
Nothing is dropped silently: every rejection carries its reason and the record itself.
"""

from __future__ import annotations

from tracesft.answers import answer_to_label, extract_answer
from tracesft.traces import RejectedTrace, TraceBatch, TraceRecord, VerificationResult

UNPARSEABLE = "unparseable_answer"
WRONG = "wrong_answer"
FLAG_CONTRADICTS_TEXT = "flag_contradicts_text"
DUPLICATE = "duplicate"


def verify(batch: TraceBatch) -> VerificationResult:
    kept: list[TraceRecord] = []
    rejected: list[RejectedTrace] = []
    seen: dict[tuple[str, str], TraceRecord] = {}
    for record in batch.records:
        reason, detail = _judge(record)
        key = (" ".join(record.query.split()), " ".join(record.trace.split()))
        if reason is None and key in seen:
            reason, detail = DUPLICATE, f"same query and trace as {seen[key].where}"
        if reason is None:
            seen[key] = record
            kept.append(record)
        else:
            rejected.append(RejectedTrace(record=record, reason=reason, detail=detail))
    return VerificationResult(kept=batch.model_copy(update={"records": kept}), rejected=rejected)


def _judge(record: TraceRecord) -> tuple[str | None, str]:
    answer = extract_answer(record.trace)
    label = answer_to_label(answer)
    if label is None:
        return UNPARSEABLE, "no final yes/no answer could be read from the trace"
    text_is_right = label == record.gold
    if record.flagged_correct is not None and record.flagged_correct != text_is_right:
        return FLAG_CONTRADICTS_TEXT, (
            f"harness flag says {'correct' if record.flagged_correct else 'wrong'}, "
            f"but the trace answers {answer!r} against gold {record.gold}"
        )
    if not text_is_right:
        return WRONG, f"trace answers {answer!r}, gold label is {record.gold}"
    return None, ""
