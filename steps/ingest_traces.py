from typing import Annotated

from zenml import log_metadata, step

from tracesft.data.ingest import ingest
from tracesft.data.traces import TraceBatch


@step
def ingest_traces(
    paths: list[str], field_map: dict[str, str], content_hash: str, on_bad_record: str = "error"
) -> Annotated[TraceBatch, "raw_traces"]:
    """Read the GPT result files.

    `content_hash` (computed by the pipeline from the files' bytes) is what makes ZenML's cache
    key follow the traces' content: unchanged files are served from the cache, and a new or
    edited file reruns this step and everything downstream.
    """
    batch = ingest(paths, field_map, on_bad_record)
    log_metadata(
        {
            "records": len(batch.records),
            "files": len(batch.files),
            "content_hash": content_hash,
            "skipped_records": [f"{s.source} ({s.locator}): {s.error}" for s in batch.skipped],
        }
    )
    return batch
