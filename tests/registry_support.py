"""Shared by the registry tests: a real `mlflow server` and real (tiny) LoRA adapters.

The server runs as docs/architecture.md describes a local one: sqlite backend, 127.0.0.1, a free port, one worker, job
execution off, artifacts proxied by the server (`mlflow-artifacts:/`), so uploads and downloads
go over HTTP just as against a team's tracking server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from tracesft.train.adapter import LoraAdapter, write_metadata
from tracesft.config import TrainingRecipe
from tracesft.train.tiny_model import build_tiny_model

CORPUS = [
    "Premise: Suppose there is a closed system of 3 variables, A, B and C. A correlates with B. "
    "However, B and C are independent given A.\nHypothesis: A directly causes B.",
    "<think>\nB and C become independent once we condition on A.\n</think>\n\nAnswer: Yes",
    "<think>\nA and D are unconditionally independent.\n</think>\n\nAnswer: No",
]
QUERY = "Premise: A correlates with B. B correlates with C.\nHypothesis: A directly causes C."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """One `mlflow server` process group; `kill()` simulates a crash, `start()` brings it back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; see {self.root / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout_s} s; see {self.root / 'server.log'}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """A crash: SIGKILL to the whole process group, no chance to clean up."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)


def tiny_base(root: Path) -> Path:
    return build_tiny_model(root / "tiny-base", CORPUS, vocab_size=400)


def tiny_adapter(base: Path, out: Path, seed: int, **metadata: Any) -> LoraAdapter:
    """A real PEFT LoRA adapter on the tiny model, saved as training saves one.

    `init_lora_weights=False` draws both LoRA matrices at random, so the adapter changes the
    model's outputs (a fresh default adapter is a no-op) and each seed gives different files.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                       task_type="CAUSAL_LM"),
        )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    recipe = TrainingRecipe(lora_r=4, lora_alpha=8).model_dump()
    return write_metadata(
        out,
        {"base_model": str(base), "base_model_revision": None, "traces_content_hash": f"{seed:02d}" * 32,
         "recipe": recipe, "training": {"train_examples": 7}} | metadata,
    )
