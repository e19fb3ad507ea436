from typing import Annotated

from zenml import log_metadata, step

from tracesft.data.traces import RejectedTrace, TraceBatch
from tracesft.data.verify import verify


@step
def verify_traces(raw: TraceBatch) -> tuple[
    Annotated[TraceBatch, "verified_traces"], Annotated[list[RejectedTrace], "rejected_traces"]
]:
    """Keep traces whose own answer matches gold; the rest become an artifact with reasons."""
    result = verify(raw)
    log_metadata({"records": len(raw.records), "kept": len(result.kept.records), "rejected": result.rejected_by_reason()})
    return result.kept, result.rejected
