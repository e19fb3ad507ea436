"""The demo's workspace under `.tracesft/`: what the embedded configuration points at.

Everything is made locally and reproducibly (no hub, nothing outside the repository): the tiny model is built
from the bundled problems, the sample traces and eval set are copied from the package. Existing
files are left alone, so a user can edit or add trace files and watch the pipeline rerun.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tracesft.data.sample_data import DATA, EVAL_CSV, TRACE_FILES, tokenizer_corpus
from tracesft.train.tiny_model import build_tiny_model
from tracesft.train.tracking import STATE_DIR


def prepare_demo_workspace(state_dir: Path = STATE_DIR) -> None:
    model_dir = state_dir / "tiny-model"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, tokenizer_corpus())
    traces_dir = state_dir / "traces"
    if not traces_dir.exists():
        traces_dir.mkdir(parents=True)
        for name in TRACE_FILES:
            (traces_dir / name).write_bytes((DATA / "sample_traces" / name).read_bytes())
    eval_csv = state_dir / "eval" / EVAL_CSV
    if not eval_csv.exists():
        eval_csv.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(str(DATA / EVAL_CSV), eval_csv)
