"""The GRPO pipeline: a registered adapter in, trained on its own answers to fresh problems with a
solver-verified reward, scored and registered as its child (docs/architecture.md).

Its parameters are the fields of `tracesft.config.GrpoRunConfig`. On the client, before any step
runs: the eval set is hashed (the cache follows its bytes), the configured parent (an alias,
`champion` by default, or a version) is resolved to a version number and its adapter's content
hash, and the eval problems that version was scored on are looked up in the ZenML run that
registered it. The steps get those, so the cache keys on what the alias pointed at, and the new
version is scored on exactly the problems its parent and the champion were: the gate compares like
with like, and no problem the SFT adapter trained on is scored.

The rest is the SFT pipeline's tail, the same steps: evaluate base and trained model, paired
bootstrap, register (with lineage tags `stage=grpo`, `parent_version`, `reward`), and the gate.
"""

from typing import Any, Optional

from zenml import Model, pipeline

import materializers  # noqa: F401  (registers the LoraAdapter materializer)
from steps import (
    compare_models,
    evaluate_model,
    generate_grpo_problems,
    load_parent_adapter,
    promote_adapter,
    register_adapter,
    train_grpo_adapter,
)
from tracesft.config import Device, EvalSettings, GrpoSettings, ProblemSettings, RegistrySettings, RewardSettings
from tracesft.errors import TracesftError
from tracesft.evaluate.eval_set import eval_set_hash
from tracesft.rl.parent import ParentVersion, resolve_parent


def parent_evaluation_inputs(parent: ParentVersion) -> tuple[Any, Any | None]:
    """The eval problems (and validation problems, if any) the parent's own evaluation read, as
    ZenML artifact versions of the run that registered it (an SFT or a GRPO run alike)."""
    from zenml.client import Client

    try:
        run = Client().get_pipeline_run(parent.zenml_run_id)
    except KeyError:
        run = None
    step = run.steps.get("evaluate_base") if run is not None else None
    if step is None or "problems" not in step.inputs:
        raise TracesftError(
            f"parameters.parent: {parent.name} version {parent.version} was registered by ZenML run "
            f"{parent.zenml_run_id}, which this ZenML store does not hold (or which never evaluated); run GRPO "
            "against the ZenML store that trained it (ZENML_CONFIG_PATH or the server it used)."
        )
    validation = step.inputs.get("validation")
    return step.inputs["problems"][0], validation[0] if validation else None


@pipeline(enable_cache=True, model=Model(name=RegistrySettings().model_name))
def grpo_pipeline(
    eval_set: str,
    parent: str = "champion",
    device: Device = "cuda",
    base_model: Optional[str] = None,
    problems: ProblemSettings = ProblemSettings(),
    reward: RewardSettings = RewardSettings(),
    grpo: GrpoSettings = GrpoSettings(),
    evaluation: EvalSettings = EvalSettings(),
    registry: RegistrySettings = RegistrySettings(),
) -> None:
    eval_hash = eval_set_hash(eval_set)
    origin = resolve_parent(registry, parent, eval_hash)
    eval_problems, validation = parent_evaluation_inputs(origin)
    base = base_model or origin.base_model
    adapter, recipe = load_parent_adapter(origin.version, origin.content_hash, registry)
    train_problems = generate_grpo_problems(problems, eval_set, eval_hash)
    tuned = train_grpo_adapter(
        adapter, origin.version, train_problems, base, origin.base_model_revision, grpo, reward, device, registry
    )
    base_report = evaluate_model(
        eval_problems, base, origin.base_model_revision, evaluation, recipe, device, validation=validation,
        id="evaluate_base",
    )
    tuned_report = evaluate_model(
        eval_problems, base, origin.base_model_revision, evaluation, recipe, device, tuned, validation,
        id="evaluate_grpo",
    )
    comparison, _report_page = compare_models(base_report, tuned_report, tuned, evaluation, registry)
    version = register_adapter(tuned, base_report, tuned_report, eval_hash, registry)
    promote_adapter(version, base_report, tuned_report, comparison, registry)
