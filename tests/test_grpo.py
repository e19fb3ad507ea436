"""The GRPO stage's parts without a trainer: the reward, the problems and their separation from the
eval set, its configuration, and the parent's resolution against a real MLflow registry.
(The pipeline itself runs in tests/test_pipeline_e2e.py, continuing the SFT run's version.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tracesft.config import (
    GrpoSettings,
    ProblemSettings,
    RegistrySettings,
    RewardSettings,
    embedded_config_path,
    embedded_grpo_config_path,
    load_grpo_config,
    load_run_config,
)
from tracesft.data.generator import generate_problems
from tracesft.errors import TracesftError
from tracesft.evaluate.eval_set import EvalProblem
from tracesft.rl.parent import resolve_parent
from tracesft.rl.problems import GrpoProblem, check_held_apart, fresh_problems, problem_hash
from tracesft.rl.reward import REWARD_PARTS, closed_think, correctness, one_answer, reward_weights

REPO_ROOT = Path(__file__).resolve().parents[1]
NOT_IMPLIED = "Premise: Suppose there is a closed system of 2 variables, A and B. All the statistical relations among these 2 variables are as follows: A correlates with B.\nHypothesis: A directly causes B."


# --- the reward ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("completion", "right", "closed", "one"),
    [
        ("A correlation alone fixes no direction.\n</think>\n\nAnswer: No", 1, 1, 1),
        ("It must be causal.\n</think>\n\nAnswer: Yes", 0, 1, 1),  # well formed, wrong: the solver says 0
        ("Still thinking about colliders and", 0, 0, 0),  # no answer, no reward
        ("Maybe.\n</think>\n\nAnswer: Yes\nAnswer: No", 1, 1, 0),  # the last answer counts; two lines are not one answer
        ("x</think>y</think>\n\nAnswer: No", 1, 0, 0),  # a second </think>: not one closed block
        ("<think>short\n</think>\nAnswer: No.", 1, 1, 1),  # the completion may open the block itself
    ],
)
def test_reward_parts(completion, right, closed, one):
    assert correctness([completion], query=[NOT_IMPLIED]) == [right]
    assert closed_think([completion]) == [closed]
    assert one_answer([completion]) == [one]


def test_conversational_completions_are_read_as_text_and_weights_follow_the_parts():
    messages = [[{"role": "assistant", "content": "No link is proven.\n</think>\n\nAnswer: No"}]]
    assert correctness(messages, query=[NOT_IMPLIED]) == [1.0]
    settings = RewardSettings(correctness=2.0, closed_think=0.5, one_answer=0.25)
    assert [part.__name__ for part in REWARD_PARTS] == ["correctness", "closed_think", "one_answer"]
    assert reward_weights(settings) == [2.0, 0.5, 0.25]


# --- problems held apart from the eval set -------------------------------------------------------

def _eval_problems(rows: list[dict]) -> list[EvalProblem]:
    return [EvalProblem(query=r["input"], label=int(r["label"]), num_variables=int(r["num_variables"]),
                        template=r["template"], row=i, line=i + 2) for i, r in enumerate(rows)]


def test_fresh_problems_are_of_the_family_labelled_by_the_solver_and_seeded():
    settings = ProblemSettings(count=40, templates=["has_collider"], min_variables=3, max_variables=4, positive_share=0.5)
    problems = fresh_problems(settings, [])
    assert len(problems) == 40 and {p.template for p in problems} == {"has_collider"}
    assert {p.num_variables for p in problems} <= {3, 4} and 0 < sum(p.label for p in problems) < 40
    assert problems == fresh_problems(settings, [])


def test_an_eval_problem_is_never_drawn_by_construction():
    """Two-variable `parent` problems have few distinct texts: with all of them in the eval set but
    one, every draw must be that one."""
    settings = ProblemSettings(count=20, templates=["parent"], min_variables=2, max_variables=2, positive_share=None)
    drawn = {p.query for p in fresh_problems(settings, [])}
    assert len(drawn) > 1
    kept = sorted(drawn)[0]
    eval_problems = _eval_problems([{"input": q, "label": "0", "num_variables": "2", "template": "parent"}
                                    for q in drawn if q != kept])
    assert {p.query for p in fresh_problems(settings, eval_problems)} == {kept}


def test_an_overlap_is_caught_by_check_with_the_eval_rows_line():
    rows = generate_problems(3, seed=5)
    eval_problems = _eval_problems(rows)
    # The same text with other whitespace is the same problem.
    leaked = GrpoProblem(query="  " + rows[1]["input"].replace(" ", "  "), label=int(rows[1]["label"]),
                         num_variables=int(rows[1]["num_variables"]), template=rows[1]["template"])
    assert problem_hash(leaked.query) == problem_hash(rows[1]["input"])
    check_held_apart(fresh_problems(ProblemSettings(count=10), eval_problems), eval_problems, "eval.csv")
    with pytest.raises(TracesftError, match=r"eval.csv \(line 3\): GRPO problem 2 is this eval problem"):
        check_held_apart([GrpoProblem(query="other", label=0, num_variables=2, template="parent"), leaked],
                         eval_problems, "eval.csv")


def test_a_family_the_generator_cannot_fill_is_refused_with_the_settings_to_change():
    # Over three variables only a collider orients edges, so no chain, and no ancestor through another
    # variable, is ever implied: the generator draws valid problems of other templates only.
    settings = ProblemSettings(count=5, templates=["non-parent ancestor"], min_variables=3, max_variables=3,
                               positive_share=1.0)
    with pytest.raises(TracesftError, match="widen problems.templates"):
        fresh_problems(settings, [])


# --- configuration -------------------------------------------------------------------------------

def test_embedded_grpo_config_uses_the_demos_registry_eval_set_and_device():
    grpo, demo = load_grpo_config(), load_run_config()
    assert embedded_grpo_config_path().is_file()
    assert grpo.registry == demo.registry and grpo.eval_set == demo.eval_set and grpo.device == demo.device == "cpu"
    assert grpo.evaluation.max_new_tokens == demo.evaluation.max_new_tokens
    production = load_grpo_config(REPO_ROOT / "configs" / "grpo-production.yaml")
    sft = load_run_config(REPO_ROOT / "zenml_config.yaml")
    assert production.registry == sft.registry and production.eval_set == sft.eval_set
    assert production.evaluation == sft.evaluation and production.parent == "champion" and production.device == "cuda"
    assert embedded_config_path().parent == embedded_grpo_config_path().parent


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"grpo": {"num_generations": 3}}, "parameters.grpo: Value error, per_device_train_batch_size x gradient_accumulation_steps (64) must be a multiple of num_generations (3)"),
        ({"problems": {"templates": ["parents"]}}, "parameters.problems: Value error, templates must be a non-empty list"),
        ({"reward": {"corectness": 1.0}}, "parameters.reward.corectness: Extra inputs are not permitted"),
        ({"grpo": {"generation": "vllm"}}, "parameters.grpo.generation"),
        ({"problems": {"max_variables": 2}}, "parameters.problems: Value error, no hypothesis over two variables ever holds"),
    ],
)
def test_a_bad_grpo_setting_is_named_as_the_file_loads(tmp_path, parameters, named):
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({"parameters": {"eval_set": "eval.csv", **parameters}}))
    with pytest.raises(TracesftError) as excinfo:
        load_grpo_config(path)
    assert named in str(excinfo.value) and str(path) in str(excinfo.value)


def test_grpo_settings_defaults_are_whole_groups():
    settings = GrpoSettings()
    assert settings.per_device_train_batch_size * settings.gradient_accumulation_steps % settings.num_generations == 0


# --- the parent ------------------------------------------------------------------------------------

def test_a_parent_the_registry_lacks_is_named_with_what_to_do(tmp_path):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", model_name="nothing-yet")
    with pytest.raises(TracesftError) as excinfo:
        resolve_parent(settings, "champion", "0" * 64)
    message = str(excinfo.value)
    assert "parameters.parent: nothing-yet has no alias 'champion' (versions: none registered)" in message
    assert "tracesft demo" in message


def test_a_parent_must_carry_pipeline_lineage_and_the_configured_eval_sets_hash(tmp_path):
    from mlflow import MlflowClient

    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", model_name="tiny")
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    client.create_registered_model("tiny")
    lineage = {"base_model": "tiny-model", "zenml_run_id": "run-1", "eval_set_hash": "a" * 64, "adapter_content_hash": "c" * 64}
    client.create_model_version("tiny", source="file:///nowhere", tags={"base_model": "tiny-model"})
    client.create_model_version("tiny", source="file:///nowhere", tags=lineage)
    client.set_registered_model_alias("tiny", "champion", "2")

    with pytest.raises(TracesftError, match=r"parameters.parent: tiny version 1 lacks the lineage tags \['zenml_run_id'"):
        resolve_parent(settings, "1", "a" * 64)
    with pytest.raises(TracesftError, match="parameters.eval_set: not the eval set tiny version 2 was scored on"):
        resolve_parent(settings, "champion", "b" * 64)
    parent = resolve_parent(settings, "champion", "a" * 64)
    assert (parent.version, parent.zenml_run_id, parent.content_hash, parent.base_model_revision) == ("2", "run-1", "c" * 64, None)
