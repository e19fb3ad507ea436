"""One rank of a multi-process training run: `python -m tracesft.train.distributed_worker ...`.

`tracesft.train.distributed.train_lora_distributed` starts one of these per GPU through
`accelerate launch`; each calls the same `train_lora` as a one-GPU run. Rank 0 writes the adapter,
the summary and the Trainer's log history into `--out`; the other ranks write into
`--out/rank-N`, so no two processes ever write the same file. When the launching step has an
active MLflow run (`MLFLOW_RUN_ID`), rank 0 logs its training curves into that run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import get_args

from tracesft.config import Device, TrainingRecipe
from tracesft.train.distributed import LOG_HISTORY_FILE, SUMMARY_FILE
from tracesft.data.sft_dataset import SFTDataset
from tracesft.train.training import train_lora


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True, help="SFTDataset as JSON")
    parser.add_argument("--recipe", type=Path, required=True, help="TrainingRecipe as JSON")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--device", choices=get_args(Device), required=True)
    parser.add_argument("--revision", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from accelerate import PartialState
    from transformers import TrainerCallback

    # Initialise the process group now, before the model loads: it makes this rank's GPU the
    # current device, which is where `load_base_model` puts the 4-bit weights. A cpu rank must say
    # so (PartialState does not read ACCELERATE_USE_CPU itself), or it would believe it runs alone.
    state = PartialState(cpu=args.device == "cpu")
    if state.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        raise RuntimeError(f"rank setup ({state.num_processes} processes) does not match the launch ({os.environ['WORLD_SIZE']})")
    dataset = SFTDataset.model_validate_json(args.dataset.read_text(encoding="utf-8"))
    recipe = TrainingRecipe.model_validate_json(args.recipe.read_text(encoding="utf-8"))
    output_dir = args.out if state.is_main_process else args.out / f"rank-{state.process_index}"

    history: list[dict] = []

    class LogHistory(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                history.append({"step": state.global_step} | {k: v for k, v in logs.items() if isinstance(v, (int, float))})

    callbacks = [LogHistory()]
    with _mlflow_run(state.is_main_process, args.device) as mlflow_callback:
        if mlflow_callback is not None:
            callbacks.append(mlflow_callback)
        _, summary = train_lora(dataset, args.base_model, recipe, args.device, output_dir, args.revision, callbacks=callbacks)
    if state.is_main_process:
        (output_dir / SUMMARY_FILE).write_text(summary.model_dump_json(), encoding="utf-8")
        (output_dir / LOG_HISTORY_FILE).write_text(json.dumps(history), encoding="utf-8")
    state.wait_for_everyone()
    state.destroy_process_group()


@contextlib.contextmanager
def _mlflow_run(is_main_process: bool, device: Device):
    """On rank 0, reattach to the launching step's MLflow run and yield a logging callback."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not (is_main_process and run_id):
        yield None
        return
    import mlflow

    from tracesft.train.tracking import mlflow_logging_callback

    with mlflow.start_run(run_id=run_id):
        yield mlflow_logging_callback(device)


if __name__ == "__main__":
    main()
