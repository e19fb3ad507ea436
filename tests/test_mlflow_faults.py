"""An MLflow server that fails in the middle of a pipeline run: the run stops within seconds with
one line naming the server, its MLflow run is marked FAILED, its ZenML run failed, and its scratch
folders (checkpoints with optimizer state, the adapter) are gone.

A real `mlflow server` behind a small fault-injecting HTTP proxy of this file's own (the registry
tests grow a fuller one): the proxy lets the training run open and record its parameters, then
answers every later metrics upload with 503, as a server that falls over mid-training does.
MLflow's default patience (7 retries, doubling waits) would stall the step for minutes; tracesft
bounds it. The pipeline is the shipped `train_adapter` step alone, on the tiny model.
"""

from __future__ import annotations

import http.client
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from zenml import pipeline

from steps import train_adapter
from tracesft.config import RegistrySettings, TrainingRecipe
from tracesft.data.ingest import ingest
from tracesft.data.sample_data import DATA, tokenizer_corpus
from tracesft.data.sft_dataset import SFTDataset
from tracesft.data.verify import verify
from tracesft.errors import TracesftError
from tracesft.train.tiny_model import build_tiny_model

from tests.registry_support import MlflowServer

pytestmark = pytest.mark.integration

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class FaultProxy:
    """Forwards HTTP to `target`; answers 503 to metric uploads (`runs/log-batch`) after the first."""

    def __init__(self, target: str) -> None:
        self.target = urlsplit(target)
        self.batches = 0
        self.failed: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.endswith("/runs/log-batch"):
                    proxy.batches += 1
                    if proxy.batches > 1:  # the parameters pass, the training metrics do not
                        proxy.failed.append(self.path)
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                connection = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                connection.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pipeline(enable_cache=False)
def training_only(dataset: SFTDataset, base_model: str, recipe: TrainingRecipe, registry: RegistrySettings) -> None:
    train_adapter(dataset, base_model, None, recipe, "cpu", registry)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    server = MlflowServer(tmp_path_factory.mktemp("faults-mlflow"))
    server.start()
    yield server
    server.stop()


def test_an_mlflow_outage_mid_training_fails_the_run_quickly_and_cleanly(
    server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from zenml.client import Client
    from zenml.enums import ExecutionMode
    from zenml.utils import source_utils

    base = build_tiny_model(tmp_path / "tiny", tokenizer_corpus())
    records = verify(ingest([str(DATA / "sample_traces")])).kept.records[:8]
    dataset = SFTDataset(train=records, validation=[], content_hash="f" * 64, validation_fraction=0.15, seed=42)
    recipe = TrainingRecipe(num_train_epochs=1, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                            gradient_checkpointing=False, logging_steps=1, learning_rate=1e-3)
    proxy = FaultProxy(server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
    scratch_root = tmp_path / "system-temp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))  # where the step's scratch folders go
    source_utils.set_custom_source_root(str(Path(__file__).resolve().parent.parent))
    run = training_only.with_options(execution_mode=ExecutionMode.FAIL_FAST)

    started = time.monotonic()
    try:
        with pytest.raises(TracesftError) as raised:
            run(dataset, str(base), recipe, RegistrySettings(experiment_name="faults"))
    finally:
        proxy.close()
    elapsed = time.monotonic() - started

    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"MLflow at {proxy.uri} failed after 3 retries; check that")
    assert proxy.failed and elapsed < 60  # MLflow's own patience: ~8 minutes
    [mlflow_run] = MlflowClient(server.uri).search_runs([MlflowClient(server.uri).get_experiment_by_name("faults").experiment_id])
    assert mlflow_run.info.status == "FAILED"
    assert Client().get_pipeline("training_only").last_run.status.value == "failed"
    assert not [p.name for p in scratch_root.iterdir() if p.name.startswith("tracesft-")]
