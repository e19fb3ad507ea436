"""The tracesft pipeline: verified GPT traces in, a promoted LoRA adapter out (docs/architecture.md).

Its parameters are the fields of `tracesft.config.RunConfig`, so a run configuration's
`parameters:` section configures it whether it is started by `zenml pipeline run` or by
`tracesft run`. Content hashes of the trace files and the eval set are computed here, on the
client, and passed to the steps that read those files: that is what ties ZenML's cache to the
data's bytes rather than to file names. Relative paths are read against the workspace
(`tracesft.workspace`) as the parameters are validated, so `zenml pipeline run` from any folder
and every `tracesft` command give the steps the same absolute paths. `device` is a parameter of
every step that loads a model, so a cpu run and a cuda run (different precision and
quantisation) never share cached outputs.
"""

from typing import Optional

from zenml import Model, pipeline

import materializers  # noqa: F401  (registers the LoraAdapter materializer)
from steps import (
    build_sft_dataset,
    compare_models,
    evaluate_model,
    ingest_traces,
    load_eval_problems,
    load_validation_problems,
    promote_adapter,
    register_adapter,
    train_adapter,
    validate_traces,
    verify_traces,
)
from tracesft.config import (
    PRODUCTION_BASE_MODEL,
    DatasetSettings,
    Device,
    EvalSettings,
    QualitySettings,
    RegistrySettings,
    TrainingRecipe,
)
from tracesft.data.ingest import content_hash
from tracesft.evaluate.eval_set import eval_set_hash
from tracesft.workspace import ModelSource, WorkspacePath


# Each run gets a version of this ZenML model (the Model Control Plane): the register and promote
# steps log lineage, scores and the gate's decision on it as what that run did (who is champion
# only the MLflow alias says: ZenML's version numbers cannot follow MLflow's). The name follows
# `registry.model_name`: `pipelines.run` passes it, and a run configuration's `model:` sets it
# for `zenml pipeline run`.
@pipeline(enable_cache=True, model=Model(name=RegistrySettings().model_name))
def sft_pipeline(
    traces: list[WorkspacePath],
    eval_set: WorkspacePath,
    device: Device = "cuda",
    field_map: Optional[dict[str, str]] = None,
    on_bad_record: str = "error",
    base_model: ModelSource = PRODUCTION_BASE_MODEL,
    base_model_revision: Optional[str] = None,
    dataset: DatasetSettings = DatasetSettings(),
    quality: QualitySettings = QualitySettings(),
    training: TrainingRecipe = TrainingRecipe(),
    evaluation: EvalSettings = EvalSettings(),
    registry: RegistrySettings = RegistrySettings(),
) -> None:
    eval_hash = eval_set_hash(eval_set)
    raw = ingest_traces(traces, field_map or {}, content_hash(traces), on_bad_record)
    verified, _rejected = verify_traces(raw)
    quality_report, _view = validate_traces(
        verified, base_model, base_model_revision, training.max_seq_length, eval_set, quality, registry
    )
    sft_dataset, _summary = build_sft_dataset(verified, quality_report, dataset)
    adapter = train_adapter(sft_dataset, base_model, base_model_revision, training, device, registry)
    problems = load_eval_problems(eval_set, eval_hash, sft_dataset, evaluation)
    validation = load_validation_problems(sft_dataset)
    base_report = evaluate_model(
        problems, base_model, base_model_revision, evaluation, training, device, validation=validation, id="evaluate_base"
    )
    tuned_report = evaluate_model(
        problems, base_model, base_model_revision, evaluation, training, device, adapter, validation,
        id="evaluate_finetuned",
    )
    # The gate's evidence: the paired bootstrap interval of the F1 difference, also in MLflow.
    comparison, _report_page = compare_models(base_report, tuned_report, adapter, evaluation, registry)
    version = register_adapter(adapter, base_report, tuned_report, eval_hash, registry)
    promote_adapter(version, base_report, tuned_report, comparison, registry)
