from typing import Annotated

from zenml import log_metadata, step

from tracesft.data.ingest import ingest
from tracesft.data.traces import TraceBatch

# A metadata value is one database row, and a MySQL-backed ZenML server stores it as TEXT (64 KB):
# the lists are cut to their first entries here; the `raw_traces` artifact holds them all.
LISTED_IN_METADATA = 50


@step
def ingest_traces(
    paths: list[str], field_map: dict[str, str], content_hash: str, on_bad_record: str = "error"
) -> Annotated[TraceBatch, "raw_traces"]:
    """Read the GPT result files.

    `content_hash` (computed by the pipeline from the files' bytes) is what makes ZenML's cache
    key follow the traces' content: unchanged files are served from the cache, and a new or
    edited file reruns this step and everything downstream. What was skipped or left unread is
    counted and listed in the step's metadata, where the run summary reads it.
    """
    batch = ingest(paths, field_map, on_bad_record)
    log_metadata(
        {
            "records": len(batch.records),
            "files": len(batch.files),
            "content_hash": content_hash,
            "skipped_records": len(batch.skipped),
            "skipped_records_listed": [s.model_dump() for s in batch.skipped[:LISTED_IN_METADATA]],
            "ignored_files": len(batch.ignored),
            "ignored_files_listed": [i.model_dump() for i in batch.ignored[:LISTED_IN_METADATA]],
        }
    )
    return batch
