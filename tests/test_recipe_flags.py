"""Every training-recipe field is a `tracesft run` flag with the seed script's name."""

from __future__ import annotations

import pytest
import yaml

from tracesft.cli import _parser, main
from tracesft.config import TrainingRecipe, embedded_config_path, load_run_config, with_training_overrides


def test_every_recipe_field_is_a_run_flag() -> None:
    run = _parser()._subparsers._group_actions[0].choices["run"]
    flags = {option for action in run._actions for option in action.option_strings}
    nested = {"distributed"}  # a settings block of its own, configured in the YAML
    assert {f"--{name}" for name in TrainingRecipe.model_fields if name not in nested} <= flags
    assert {"--lora_r", "--lora_alpha", "--learning_rate", "--num_train_epochs", "--use_4bit", "--use_lora",
            "--max_seq_length"} <= flags


def test_overrides_are_typed_by_the_recipe_and_keep_the_rest(tmp_path) -> None:
    derived = with_training_overrides(
        None,
        {"lora_r": "32", "use_4bit": "false", "learning_rate": "1e-4", "target_modules": "q_proj, v_proj",
         "eval_steps": "none", "checkpoint_dir": "/mnt/ckpt"},
        tmp_path,
    )
    config, embedded = load_run_config(derived), load_run_config(embedded_config_path())
    training = config.training
    assert (training.lora_r, training.use_4bit, training.learning_rate) == (32, False, 1e-4)
    assert training.target_modules == ["q_proj", "v_proj"] and training.eval_steps is None
    assert training.checkpoint_dir == "/mnt/ckpt"
    assert training.num_train_epochs == embedded.training.num_train_epochs == 3  # from the file, untouched
    assert config.model_dump(exclude={"training"}) == embedded.model_dump(exclude={"training"})
    assert yaml.safe_load(derived.read_text()).keys() == yaml.safe_load(embedded_config_path().read_text()).keys()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lora_r", "sixteen"], "--lora_r"),
        (["--lora_dropout", "1.5"], "--lora_dropout"),
        (["--use_lora", "false"], "use_4bit false"),
    ],
)
def test_bad_flag_values_are_clear_errors(argv, message, capsys) -> None:
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid training option") and message in err and "Traceback" not in err


def test_full_fine_tuning_flags_validate(tmp_path) -> None:
    derived = with_training_overrides(None, {"use_lora": "false", "use_4bit": "false"}, tmp_path)
    assert not load_run_config(derived).training.use_lora
