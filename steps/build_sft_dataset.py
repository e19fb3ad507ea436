from typing import Annotated

from zenml import log_metadata, step
from zenml.types import MarkdownString

from tracesft.config import DatasetSettings
from tracesft.data.quality import QualityReport
from tracesft.data.sft_dataset import SFTDataset, build_sft_dataset as build, summarize
from tracesft.data.traces import TraceBatch


@step
def build_sft_dataset(
    verified: TraceBatch, quality: QualityReport, settings: DatasetSettings
) -> tuple[Annotated[SFTDataset, "sft_dataset"], Annotated[MarkdownString, "sft_dataset_summary"]]:
    """The 85/15 split by problem, built only from traces that passed the quality gate."""
    quality.raise_for_failure()
    dataset = build(verified, settings.validation_fraction, settings.seed)
    log_metadata({"train": len(dataset.train), "validation": len(dataset.validation)})
    return dataset, MarkdownString(summarize(dataset))
