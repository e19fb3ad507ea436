"""Using a registered adapter: load it by alias or version onto its base model, ask it
Corr2Cause questions, or export it for serving.

The adapter's directory in the registry says which base model it adapts and with which recipe
(`tracesft_adapter.json`), and carries the tokenizer files with the chat template, so
`load_registered_adapter("models:/<name>@champion")` needs nothing else; `base_model` overrides
the recorded base when it lives elsewhere on this machine (a local copy, another mount).

The default export is what was evaluated: the adapter's files and the exact base it adapts (hub
id and revision, or local folder and its fingerprint) and how evaluation loaded that base, for a
server that applies LoRA itself. A merged export is a different function (every merged weight
rounded once more), so it is measured against the evaluated one first
(`tracesft.registry.merge_deviation`), the figure is tagged on the model version, and it is
refused above `registry.max_merged_logit_deviation`. Downloads go to temporary folders that are
removed when the command ends.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
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
from tracesft.generate.inference import for_decoding, model_identity
from tracesft.train.modeling import load_base_model, load_tokenizer, quantization_config
from tracesft.data.prompting import build_prompt
from tracesft.registry.merge_deviation import evaluated_logits, fixed_queries, prompt_logits, relative_deviation
from tracesft.registry.model_registry import CHAMPION, registry_client
from tracesft.train.tracking import existing_tracking_uri
from tracesft.user_paths import require_new_folder

_MODELS_SCHEME = "models:/"
MERGED_INFO_FILE = "tracesft_merged.json"
EXPORT_INFO_FILE = "tracesft_export.json"
DEVIATION_TAG = "merged_logit_deviation"  # + ".<dtype>.<device>" on the model version
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
    dst: Path,
    alias: str | None = None,
    version: str | None = None,
    settings: RegistrySettings | None = None,
) -> tuple[LoraAdapter, str]:
    """The registered adapter's files, downloaded into `dst`, and the version they came from."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(name_or_uri, alias, version)
    settings = (settings or load_run_config().registry).model_copy(update={"model_name": name})
    existing_tracking_uri(settings)  # reading a registry that is not there creates none
    with registry_client(settings) as client:
        try:
            found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                what = f"alias {alias!r}" if alias else f"version {version!r}"
                raise TracesftError(f"{name} has no {what}; see `tracesft adapters list`.") from None
            raise
        local = download_artifacts(artifact_uri=found.source, dst_path=str(dst), tracking_uri=client.tracking_uri)
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
    engine, so on the device the promoting evaluation ran on, it answers as measured. The
    downloaded files are removed once the weights are in memory.
    """
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="tracesft-adapter-") as scratch:
        adapter, number = download_registered_adapter(name_or_uri, Path(scratch), alias, version, settings)
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


def measured_merge(
    adapter: LoraAdapter, device: Device, base_model: str | None = None, dtype: torch.dtype = torch.bfloat16
) -> tuple[Any, Any, float]:
    """`merge_adapter`, and the merged model's deviation from the evaluated function on the fixed
    prompts (`tracesft.registry.merge_deviation`). The evaluated model is loaded, measured and
    freed first, so the two never share the GPU."""
    base, revision, recipe = _base_of(adapter, base_model)
    tokenizer = _tokenizer_of(adapter, base, revision)
    queries = fixed_queries()
    reference = evaluated_logits(adapter, base, revision, recipe, device, tokenizer, queries)
    merged, tokenizer = merge_adapter(adapter, device, base_model, dtype)
    return merged, tokenizer, relative_deviation(reference, prompt_logits(merged, tokenizer, queries))


def merged_deviation(adapter: LoraAdapter, device: Device, base_model: str | None = None,
                     dtype: torch.dtype = torch.bfloat16) -> float:
    """The deviation alone (`benchmarks/merged_export_deviation.py` runs it on the 32B)."""
    return measured_merge(adapter, device, base_model, dtype)[2]


def export_merged(
    adapter: LoraAdapter,
    out_dir: Path,
    device: Device,
    base_model: str | None = None,
    dtype: str = "bfloat16",
    source: str = "",
    max_deviation: float | None = None,
    record: Callable[[float], None] = lambda deviation: None,
) -> tuple[Path, float]:
    """Write the merged model (safetensors), its tokenizer and provenance to `out_dir`; returns it
    and its measured deviation, which `record` receives before a deviation above `max_deviation`
    is refused (nothing is written then)."""
    if dtype not in DTYPES:
        raise TracesftError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    out_dir = Path(out_dir)
    require_new_folder(out_dir, "merged model")
    model, tokenizer, deviation = measured_merge(adapter, device, base_model, DTYPES[dtype])
    record(deviation)
    if max_deviation is not None and deviation > max_deviation:
        raise TracesftError(
            f"{source or adapter.path}: merged in {dtype}, the model's logits move by {deviation:.4f} (relative, on "
            f"{len(fixed_queries())} fixed prompts) from the evaluated adapter, above registry.max_merged_logit_deviation "
            f"{max_deviation}; export the adapter with its base (without --merged), merge in --dtype float32, or raise the bound."
        )
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
        "device": device,
        "max_logit_deviation": deviation,
    }
    (out_dir / MERGED_INFO_FILE).write_text(json.dumps(info, indent=2))
    return out_dir, deviation


def export_adapter(adapter: LoraAdapter, out_dir: Path, source: str = "") -> Path:
    """Write the adapter's files and the exact base it was evaluated on (`EXPORT_INFO_FILE`) to `out_dir`."""
    out_dir = Path(out_dir)
    require_new_folder(out_dir, "adapter export")
    base, revision, recipe = _base_of(adapter, None)
    device = adapter.metadata.get("device", "unknown")  # adapters trained before the device was recorded
    quantization = quantization_config(recipe, device)
    shutil.copytree(adapter.path, out_dir, dirs_exist_ok=True)
    info = {
        "exported_from": source,
        "base_model": base,
        "base_model_revision": revision,
        "base_identity": model_identity(base, revision),  # a local folder: the fingerprint of its files
        "base_loaded_as": {
            "device": device,
            "quantization": None if quantization is None else {
                "load_in_4bit": True, "bnb_4bit_quant_type": recipe.bnb_4bit_quant_type,
                "bnb_4bit_use_double_quant": recipe.use_double_quant, "bnb_4bit_compute_dtype": "bfloat16",
            },
            "lora": "unmerged",
        },
    }
    (out_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2))
    return out_dir


def export_registered(
    settings: RegistrySettings,
    version_or_alias: str,
    out_dir: Path,
    device: Device,
    merged: bool = False,
    base_model: str | None = None,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """`tracesft adapters export`: a registered version (a number or an alias) exported into
    `out_dir`, by default as adapter + base, with `merged` as one merged model; returns what the
    command reports."""
    out_dir = Path(out_dir)
    require_new_folder(out_dir, "merged model" if merged else "adapter export")  # before the download
    if base_model is not None and not merged:
        raise TracesftError("--base-model applies to --merged only: the adapter export names the base it was evaluated on.")
    is_number = version_or_alias.isdigit()
    alias, version = (None, version_or_alias) if is_number else (version_or_alias, None)
    name = settings.model_name
    with tempfile.TemporaryDirectory(prefix="tracesft-export-") as scratch:
        adapter, number = download_registered_adapter(name, Path(scratch), alias, version, settings)
        source = f"models:/{name}/{number}"
        report: dict[str, Any] = {"name": name, "version": number}
        if not merged:
            export_adapter(adapter, out_dir, source)
            return report | {"adapter": str(out_dir), "base_model": adapter.metadata.get("base_model"),
                             "base_model_revision": adapter.metadata.get("base_model_revision")}

        def record(deviation: float) -> None:
            with registry_client(settings) as client:
                client.set_model_version_tag(name, number, f"{DEVIATION_TAG}.{dtype}.{device}", f"{deviation:.6g}")

        _, deviation = export_merged(adapter, out_dir, device, base_model, dtype, source,
                                     settings.max_merged_logit_deviation, record)
        return report | {"merged": str(out_dir), "dtype": dtype, "max_logit_deviation": deviation}


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
