"""Using a registered adapter: load it by alias or version onto its base model, ask it
Corr2Cause questions, or export base and adapter merged into one model for serving.

The adapter's directory in the registry says which base model it adapts and with which recipe
(`tracesft_adapter.json`), and carries the tokenizer files with the chat template, so
`load_registered_adapter("models:/<name>@champion")` needs nothing else; `base_model` overrides
the recorded base when it lives elsewhere on this machine (a local copy, another mount).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tracesft.train.adapter import LoraAdapter
from tracesft.data.answers import Answer, extract_answer
from tracesft.config import Device, EvalSettings, RegistrySettings, TrainingRecipe, load_run_config
from tracesft.errors import TracesftError
from tracesft.generate.batching import engine_decoder, generate_all, hf_decoder
from tracesft.generate.engine import supports
from tracesft.generate.inference import for_decoding
from tracesft.train.modeling import load_base_model, load_tokenizer
from tracesft.data.prompting import build_prompt
from tracesft.registry.model_registry import CHAMPION, registry_client
from tracesft.user_paths import require_new_folder

_MODELS_SCHEME = "models:/"
MERGED_INFO_FILE = "tracesft_merged.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedAdapter:
    """A registered adapter on its base model, ready to answer."""

    model: Any
    tokenizer: Any
    name: str
    version: str
    base_model: str

    def generate(self, queries: list[str], settings: EvalSettings | None = None) -> list[str]:
        """The model's full outputs (reasoning and answer line), prompted exactly as in training."""
        settings = settings or EvalSettings()
        prompts = [
            self.tokenizer(build_prompt(self.tokenizer, query), add_special_tokens=False)["input_ids"] for query in queries
        ]
        decoder = engine_decoder if supports(self.model) else hf_decoder
        outputs, _ = generate_all(prompts, decoder(self.model, self.tokenizer, settings), settings.batch_size, settings.max_new_tokens)
        return outputs

    def answer(self, query: str, settings: EvalSettings | None = None) -> Answer:
        """`yes`, `no` or `none` (no readable answer) for one Corr2Cause query."""
        return extract_answer(self.generate([query], settings)[0])


def parse_model_uri(name_or_uri: str, alias: str | None = None, version: str | None = None) -> tuple[str, str | None, str | None]:
    """(name, alias, version) from `models:/<name>@<alias>`, `models:/<name>/<version>` or a bare name.

    A bare name with neither alias nor version means its champion.
    """
    if name_or_uri.startswith(_MODELS_SCHEME):
        path = name_or_uri[len(_MODELS_SCHEME) :]
        if "@" in path:
            name, alias = path.split("@", 1)
        elif "/" in path:
            name, version = path.rsplit("/", 1)
        else:
            raise TracesftError(f"{name_or_uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>.")
    else:
        name = name_or_uri
    if alias is None and version is None:
        alias = CHAMPION
    if alias is not None and version is not None:
        raise TracesftError(f"{name_or_uri!r}: give an alias or a version, not both.")
    return name, alias, version


def download_registered_adapter(
    name_or_uri: str,
    alias: str | None = None,
    version: str | None = None,
    settings: RegistrySettings | None = None,
    dst: Path | None = None,
) -> tuple[LoraAdapter, str]:
    """The registered adapter's files in a local directory, and the version they came from."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(name_or_uri, alias, version)
    settings = (settings or load_run_config().registry).model_copy(update={"model_name": name})
    with registry_client(settings) as client:
        try:
            found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                what = f"alias {alias!r}" if alias else f"version {version!r}"
                raise TracesftError(f"{name} has no {what}; see `tracesft adapters list`.") from None
            raise
        dst = Path(dst or tempfile.mkdtemp(prefix="tracesft-adapter-"))
        local = client.call(download_artifacts, artifact_uri=found.source, dst_path=str(dst), tracking_uri=client.uri)
    return LoraAdapter(Path(local)), str(found.version)


def load_registered_adapter(
    name_or_uri: str,
    alias: str | None = None,
    version: str | None = None,
    base_model: str | None = None,
    settings: RegistrySettings | None = None,
    *,
    device: Device,
) -> LoadedAdapter:
    """Load `models:/<name>@champion` (or any alias or version) onto its base model.

    The base is loaded and put in its decoding form as evaluation does it on `device` (4-bit NF4
    on cuda when the recipe asks for it, then `for_decoding`), and answers go through the same
    engine, so on the device the promoting evaluation ran on, it answers as measured.
    """
    from peft import PeftModel

    adapter, number = download_registered_adapter(name_or_uri, alias, version, settings)
    base, revision, recipe = _base_of(adapter, base_model)
    tokenizer = _tokenizer_of(adapter, base, revision)
    model = PeftModel.from_pretrained(load_base_model(base, recipe, device, revision), str(adapter.path))
    model = for_decoding(model, EvalSettings()).eval()
    name = parse_model_uri(name_or_uri, alias, version)[0]
    return LoadedAdapter(model=model, tokenizer=tokenizer, name=name, version=number, base_model=base)


def merge_adapter(
    adapter: LoraAdapter, device: Device, base_model: str | None = None, dtype: torch.dtype = torch.bfloat16
) -> tuple[Any, Any]:
    """The base with the LoRA update folded into its weights, in `dtype`, and the tokenizer.

    A QLoRA adapter was trained against the 4-bit base, so where the base loads in 4-bit (on
    `device` cuda) it is dequantised first: the merged weights are then the ones training saw,
    not the original bf16 checkpoint plus an update fitted to a different set of weights. The
    merge itself runs in the loaded precision and the result is cast to `dtype` last.
    """
    from peft import PeftModel

    base, revision, recipe = _base_of(adapter, base_model)
    model = load_base_model(base, recipe, device, revision)
    if getattr(model, "is_loaded_in_4bit", False):
        model = model.dequantize()
    merged = PeftModel.from_pretrained(model, str(adapter.path)).merge_and_unload()
    return merged.to(dtype), _tokenizer_of(adapter, base, revision)


def export_merged(
    adapter: LoraAdapter,
    out_dir: Path,
    device: Device,
    base_model: str | None = None,
    dtype: str = "bfloat16",
    source: str = "",
) -> Path:
    """Write the merged model (safetensors), its tokenizer and provenance to `out_dir`."""
    if dtype not in DTYPES:
        raise TracesftError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    out_dir = Path(out_dir)
    require_new_folder(out_dir, "merged model")
    model, tokenizer = merge_adapter(adapter, device, base_model, DTYPES[dtype])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    metadata = adapter.metadata
    info = {
        "merged_from": source,
        "base_model": base_model or metadata.get("base_model"),
        "base_model_revision": metadata.get("base_model_revision"),
        "traces_content_hash": metadata.get("traces_content_hash"),
        "dtype": dtype,
    }
    (out_dir / MERGED_INFO_FILE).write_text(json.dumps(info, indent=2))
    return out_dir


def export_registered_merged(
    settings: RegistrySettings,
    version_or_alias: str,
    out_dir: Path,
    device: Device,
    base_model: str | None = None,
    dtype: str = "bfloat16",
) -> Path:
    """`tracesft adapters export`: a registered version (a number or an alias) merged into `out_dir`."""
    require_new_folder(Path(out_dir), "merged model")  # before the download, not only before the merge
    is_number = version_or_alias.isdigit()
    alias, version = (None, version_or_alias) if is_number else (version_or_alias, None)
    with tempfile.TemporaryDirectory(prefix="tracesft-export-") as scratch:
        adapter, number = download_registered_adapter(settings.model_name, alias, version, settings, Path(scratch))
        return export_merged(adapter, out_dir, device, base_model, dtype, source=f"models:/{settings.model_name}/{number}")


def _base_of(adapter: LoraAdapter, override: str | None) -> tuple[str, str | None, TrainingRecipe]:
    metadata = adapter.metadata
    base = override or metadata.get("base_model")
    if not base:
        raise TracesftError(f"{adapter.path}: the adapter does not record its base model; pass the base model explicitly.")
    recipe = TrainingRecipe.model_validate(metadata["recipe"]) if "recipe" in metadata else TrainingRecipe()
    return base, metadata.get("base_model_revision"), recipe


def _tokenizer_of(adapter: LoraAdapter, base: str, revision: str | None) -> Any:
    # The adapter carries the tokenizer (and chat template) it was trained with; older ones may not.
    if (adapter.path / "tokenizer_config.json").exists():
        return load_tokenizer(str(adapter.path))
    return load_tokenizer(base, revision)
