"""Run configuration: one typed model for every knob of a pipeline run.

The file format is ZenML's run configuration (`parameters:` holds these fields), so the very same
YAML drives `zenml pipeline run ... -c FILE`, `tracesft run --config FILE` and the `tracesft`
commands that need to find the registry. Defaults are the seed recipe (docs/architecture.md); the embedded
default (`tracesft/configs/demo.yaml`) overrides only what a CPU and a tiny model need.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tracesft.data.corr2cause import TEMPLATES
from tracesft.errors import TracesftError
from tracesft.workspace import ModelSource, WorkspacePath

PRODUCTION_BASE_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"

# What the run computes on, stated rather than guessed from the machine: it decides quantisation
# (NF4 needs CUDA), precision (bf16 or fp32), optimizer (paged 8-bit AdamW needs CUDA) and kernels,
# so a GPU job that lost its GPU must stop (`tracesft.device.require_device`), not run in fp32.
Device = Literal["cuda", "cpu"]


class _Settings(BaseModel):
    # Unknown keys are almost always typos of real knobs; reject them instead of ignoring them.
    model_config = ConfigDict(extra="forbid")


class DatasetSettings(_Settings):
    """How verified traces become the SFT train/validation split."""

    validation_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    seed: int = 42


class DistributedSettings(_Settings):
    """How many processes (one per GPU) train, and how they share the model.

    `ddp`: data-parallel QLoRA, every rank holds the whole 4-bit base (fastest while it fits on one
    card). `fsdp_qlora`: the 4-bit weights are stored in bf16 and sharded with FSDP (for bases that
    do not fit one card). The global batch is per-device batch x processes x gradient accumulation;
    with one process training runs in the step's own process, exactly as without this section.
    """

    num_processes: int = Field(1, ge=1)
    strategy: Literal["ddp", "fsdp_qlora"] = "ddp"
    main_process_port: int | None = Field(None, gt=0, lt=65536)  # None: a free port is picked


class TrainingRecipe(_Settings):
    """The seed recipe: QLoRA (NF4, double quantisation, bf16 compute) with LoRA on all projections.

    Field names follow the seed script's flags so a user of it recognises every knob; each one is
    also a `tracesft run` flag (`--lora_r 32`), generated from this class. The fields after
    `seed` are the project's own: how fast and how safely the recipe runs, not what it computes.
    """

    use_lora: bool = True  # false: full fine-tuning (needs use_4bit false: 4-bit weights cannot train)
    use_4bit: bool = True
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    use_double_quant: bool = True
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    learning_rate: float = Field(2e-5, gt=0.0)
    per_device_train_batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(8, gt=0)
    num_train_epochs: float = Field(3.0, gt=0.0)
    max_seq_length: int = Field(4096, gt=0)
    gradient_checkpointing: bool = True
    optim: str = "paged_adamw_8bit"
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = Field(0.03, ge=0.0)  # below 1: a fraction of all steps
    logging_steps: int = Field(10, gt=0)
    seed: int = 42
    # Reporters beside MLflow (which always records): [] or [wandb]. Off by default, never required.
    report_to: list[Literal["wandb"]] = Field(default_factory=list)
    wandb_project: str = "corr2cause-sft"
    wandb_run_name: str = "sft-lora-4bit"
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    # Packing: examples are laid end to end in rows of `packing_length` tokens, attention kept inside
    # each example (position ids restart, varlen attention), so no compute goes to padding. The
    # accumulation steps are rescaled so an optimizer step still sees about the seed's number of
    # tokens (batch x accumulation x mean example length). false: the seed's batching, exactly.
    packing: bool = True
    packing_length: int = Field(8192, gt=0)
    liger_kernels: bool = True  # Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) on CUDA; the loss head is TRL's
    # LoRA's training forward (`tracesft.train.lora_forward`): the adapter's branch before the frozen base
    # and one add, a Triton kernel on CUDA. The same function to bf16 rounding. false: PEFT's own forward.
    fast_lora: bool = True
    # GiB of memory training may use: with gradient_checkpointing, the last layers keep their
    # activations instead of being recomputed in backward, as many as the estimate of the peak fits
    # (`tracesft.train.memory_plan`). None: every layer recomputed. Not applied under fsdp_qlora.
    memory_budget_gib: float | None = Field(40, gt=0)
    eval_steps: int | None = Field(None, gt=0)  # validation loss every N steps; None: each epoch
    save_steps: int = Field(50, gt=0)  # a resumable checkpoint every N optimizer steps
    checkpoint_dir: WorkspacePath | None = None  # persistent root to resume from (a mounted volume); None: scratch only
    quantized_base_cache: WorkspacePath | None = None  # directory keeping the 4-bit base once built; None: no cache

    @model_validator(mode="after")
    def _full_fine_tuning_is_unquantised(self) -> "TrainingRecipe":
        if not self.use_lora and self.use_4bit:
            raise ValueError("use_lora false (full fine-tuning) needs use_4bit false: 4-bit weights cannot be trained")
        if self.packing and self.packing_length < self.max_seq_length:
            raise ValueError("packing_length must be at least max_seq_length, or one example would not fit in a row")
        return self


class QualitySettings(_Settings):
    """Thresholds of the data-quality gate (tracesft.data.quality); a failure names the key to change.

    A share bound of 0 or 1 and a count of 0 turn its check off.
    """

    min_traces: int = Field(1, ge=1)  # verified traces needed to train at all
    within_length_share: float = Field(1.0, gt=0.0, le=1.0)  # of traces that must fit max_seq_length
    # The valid class (label 1): Corr2Cause's test split holds ~15%, so the bounds sit outside it;
    # a one-class data set teaches the student to always answer the same.
    min_valid_share: float = Field(0.10, ge=0.0, le=1.0)
    max_valid_share: float = Field(0.90, ge=0.0, le=1.0)
    # Every relation template and variable count of the eval set needs this many traces.
    min_traces_per_template: int = Field(1, ge=0)
    min_traces_per_variable_count: int = Field(1, ge=0)
    # Traces longer than `long_trace_multiple` x the median token length: at most this share.
    long_trace_multiple: float = Field(3.0, gt=1.0)
    max_long_trace_share: float = Field(0.05, ge=0.0, le=1.0)
    # Traces repeating an earlier one's reasoning once case, whitespace, punctuation, digits and
    # variable names are normalised away: at most this share.
    max_near_duplicate_share: float = Field(0.10, ge=0.0, le=1.0)
    max_source_share: float = Field(0.80, gt=0.0, le=1.0)  # of the traces from any one file (with 2+ files)
    # Drift against the last dataset the gate accepted in the same MLflow experiment.
    max_valid_share_drift: float = Field(0.15, ge=0.0, le=1.0)
    max_length_kl_divergence: float = Field(0.5, ge=0.0)  # token lengths, over that dataset's quintiles
    # Eval problems that also appear among the traces are removed from the eval set; the gate
    # fails only when too little held-out eval data is left, by count or by share.
    min_held_out_eval_problems: int = Field(1, ge=0)
    min_held_out_eval_share: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _valid_share_bounds_are_ordered(self) -> "QualitySettings":
        if self.min_valid_share > self.max_valid_share:
            raise ValueError("min_valid_share must not exceed max_valid_share")
        return self


class EvalSettings(_Settings):
    """Generation settings for scoring base and fine-tuned models on the eval set."""

    max_new_tokens: int = Field(2048, gt=0)
    # Most sequences decoded at once, halved on out-of-memory. The engine (`fast_inference`) keeps
    # in its KV pool only what is in flight (prompts and answers so far): when the pool is full the
    # latest admitted request waits and is recomputed. 256 on the 32B on an H200: the pool (~290k
    # positions beside the bf16 weights) holds 256 answers of the evaluation's lengths.
    batch_size: int = Field(256, gt=0)
    do_sample: bool = False
    temperature: float = Field(0.6, gt=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    seed: int = 0  # sampling and bootstrap seed
    # A seeded sample of the eval set, stratified by template × label; None scores all of it.
    sample_size: int | None = Field(None, gt=0)
    sample_seed: int = 0
    validation_split: bool = True  # also score the traces' validation split
    renamed_variables: bool = True  # also score the eval set with variables renamed A→Z, B→Y, …
    # Per-example generations are cached here, so an interrupted evaluation resumes; None: off.
    cache_dir: WorkspacePath | None = Field(".tracesft/eval-cache", validate_default=True)
    # Decode with the continuous-batching engine (`tracesft.generate.engine`) on the seed's layers
    # without PEFT's wrappers, the NF4 base dequantised once to bf16 where memory allows and the
    # adapter unmerged (BENCHMARKS.md). false: HF `generate` through PEFT in static batches, as the seed.
    fast_inference: bool = True
    pad_to_multiple_of: int = Field(64, gt=0)  # prompts are padded to a multiple of this: few distinct shapes
    bootstrap_resamples: int = Field(10_000, gt=0)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)


class RegistrySettings(_Settings):
    """Where adapters are tracked and registered, and what a promotion must prove."""

    tracking_uri: str | None = None
    experiment_name: str = "tracesft"
    model_name: str = "corr2cause-r1-lora"
    promotion_margin: float = Field(0.0, ge=0.0)
    # `adapters export --merged` refuses a merge whose logits move further than this (relative, on
    # fixed prompts) from the evaluated adapter. 0.02 is the bound the evaluation's own fast paths
    # are held to (benchmarks/eval_throughput.py): a merge is served only if it is as faithful to
    # the promoted scores as evaluation is to the seed. A float32 merge stays near 1e-6; the 32B's
    # bf16 merge moved 0.143 and is refused.
    max_merged_logit_deviation: float = Field(0.02, ge=0.0)
    # How long a registration or promotion may hold the registry lock before it stops writing; a
    # holder that died is taken over once its hold is this old plus the HTTP timeout
    # (tracesft/registry/lock.py). Waiters give up after half of it.
    lock_lease_s: float = Field(60.0, gt=0.0)

    @field_validator("model_name")
    @classmethod
    def _mlflow_accepts_model_name(cls, name: str) -> str:
        # MLflow's own rule for registered model names. MLflow applies it only when the adapter is
        # registered, after training and evaluation; checked here, the run fails as it loads.
        if not name.strip() or "/" in name or ":" in name or name == "." or name.startswith(".."):
            raise ValueError(
                f"{name!r} is not a name MLflow can register: it must not be blank, contain '/' or ':', "
                "be '.' or start with '..' (e.g. corr2cause-r1-lora)"
            )
        return name


class RunConfig(_Settings):
    """Everything one pipeline run needs; mirrors the pipeline's parameters one to one."""

    traces: list[WorkspacePath] = Field(min_length=1)
    device: Device = "cuda"  # cpu: unquantised fp32 with AdamW (the demo); cuda: the seed recipe as written
    field_map: dict[str, str] = Field(default_factory=dict)
    # A record ingestion cannot read (e.g. one broken JSONL line): stop the run ("error") or skip
    # it and list it in the ingested batch and the step's metadata ("skip").
    on_bad_record: Literal["error", "skip"] = "error"
    base_model: ModelSource = PRODUCTION_BASE_MODEL
    base_model_revision: str | None = None
    eval_set: WorkspacePath
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    training: TrainingRecipe = Field(default_factory=TrainingRecipe)
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)


class ProblemSettings(_Settings):
    """Fresh problems for GRPO (`tracesft.rl.problems`): drawn by the project's generator, never an eval problem.

    `templates` and the variable range pick a problem family; `positive_share` the share of problems
    whose hypothesis holds (None: as drawn, about 6%: a policy answering "No" would then win most rewards).
    """

    count: int = Field(512, gt=0)
    seed: int = 0
    min_variables: int = Field(2, ge=2, le=6)
    max_variables: int = Field(6, ge=2, le=6)
    positive_share: float | None = Field(0.5, ge=0.0, le=1.0)
    templates: list[str] | None = None  # None: all six relation templates

    @model_validator(mode="after")
    def _a_family_that_exists(self) -> "ProblemSettings":
        if self.min_variables > self.max_variables:
            raise ValueError("min_variables must not exceed max_variables")
        if self.max_variables == 2 and self.positive_share:
            # The generator would draw forever: over two variables the equivalence class never fixes a direction.
            raise ValueError("no hypothesis over two variables ever holds: set positive_share to 0 or max_variables above 2")
        unknown = sorted(set(self.templates or ()) - set(TEMPLATES))
        if unknown or self.templates == []:
            raise ValueError(f"templates must be a non-empty list of {', '.join(TEMPLATES)}; got {unknown or '[]'}")
        return self


class RewardSettings(_Settings):
    """Weights of the GRPO reward's parts (`tracesft.rl.reward`); the reward is their weighted sum.

    Correctness is what the model is for; the format terms are small, so a well-formatted wrong
    answer never outscores a right one.
    """

    correctness: float = Field(1.0, ge=0.0)  # the extracted answer is the solver's label; no answer: 0
    closed_think: float = Field(0.1, ge=0.0)  # the reasoning ends with exactly one </think>
    one_answer: float = Field(0.1, ge=0.0)  # exactly one `Answer: Yes|No` line after it


class GrpoSettings(_Settings):
    """How TRL's `GRPOTrainer` continues the parent's LoRA (`tracesft.rl.grpo`).

    An optimizer step sees `per_device_train_batch_size x gradient_accumulation_steps` completions:
    that many divided by `num_generations` problems, each answered `num_generations` times, all
    generated at once. Quantisation, optimizer and gradient checkpointing follow the parent's recipe.
    """

    learning_rate: float = Field(5e-6, gt=0.0)
    lr_scheduler_type: str = "constant"
    max_steps: int = Field(200, gt=0)
    num_generations: int = Field(8, ge=2)  # answers per problem: the group whose mean is the baseline
    per_device_train_batch_size: int = Field(8, gt=0)  # completions per forward
    gradient_accumulation_steps: int = Field(8, gt=0)
    max_completion_length: int = Field(2048, gt=0)  # as evaluation's max_new_tokens: an answer must fit there
    temperature: float = Field(0.6, gt=0.0)  # DeepSeek's recommendation for R1 models
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    beta: float = Field(0.0, ge=0.0)  # KL to the parent adapter; 0 (TRL's default): off, no reference forward
    # engine: the project's continuous-batching engine through TRL's `rollout_func`; trl: TRL's own
    # transformers `generate` (static batches)
    generation: Literal["engine", "trl"] = "engine"
    logging_steps: int = Field(1, gt=0)
    seed: int = 42

    @model_validator(mode="after")
    def _whole_groups(self) -> "GrpoSettings":
        completions = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if completions % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size x gradient_accumulation_steps ({completions}) must be a multiple of "
                f"num_generations ({self.num_generations}): each problem's answers form one group"
            )
        return self


class GrpoRunConfig(_Settings):
    """Everything one GRPO pipeline run needs; mirrors `pipelines.grpo_pipeline`'s parameters one to one."""

    parent: str = "champion"  # the registered adapter to continue: an alias or a version number
    eval_set: WorkspacePath  # the Corr2Cause CSV the parent was scored on; GRPO problems are held apart from it
    device: Device = "cuda"
    base_model: ModelSource | None = None  # where the parent's base lives on this machine; None: as the parent records
    problems: ProblemSettings = Field(default_factory=ProblemSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    grpo: GrpoSettings = Field(default_factory=GrpoSettings)
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)


def with_training_overrides(path: str | Path | None, overrides: dict[str, str], out_dir: Path) -> Path:
    """A copy of run configuration `path` with `parameters.training` fields replaced; returns its path.

    Values arrive as command-line strings (`--lora_r 32`, `--use_4bit false`,
    `--target_modules q_proj,v_proj`, `--checkpoint_dir none`) and are converted by the recipe's
    own field types, so a bad value is reported like a bad YAML value, with the flag's name.
    """
    path = Path(path) if path is not None else embedded_config_path()
    load_run_config(path)  # a broken base file is reported as such, not as a bad override
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    training = dict(document["parameters"].get("training") or {})
    for name, text in overrides.items():
        field = TrainingRecipe.model_fields[name]
        if text.strip().lower() in ("none", "null") and _accepts_none(field.annotation):
            training[name] = None
        elif "list" in str(field.annotation):
            training[name] = [part.strip() for part in text.split(",") if part.strip()]
        else:
            training[name] = text
    try:
        recipe = TrainingRecipe.model_validate(training)
    except ValidationError as err:
        problems = "; ".join(f"--{'.'.join(str(p) for p in e['loc']) or 'training'}: {e['msg']}" for e in err.errors())
        raise TracesftError(f"invalid training option: {problems}.") from None
    document["parameters"]["training"] = recipe.model_dump(include=set(training))
    out_dir.mkdir(parents=True, exist_ok=True)
    derived = out_dir / f"{path.stem}.overridden.yaml"
    derived.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return derived


def _accepts_none(annotation: object) -> bool:
    return type(None) in get_args(annotation)


def embedded_config_path() -> Path:
    """The configuration `make demo` runs and every `tracesft` command uses without `--config`."""
    return Path(str(resources.files("tracesft") / "configs" / "demo.yaml"))


def load_run_config(path: str | Path | None = None) -> RunConfig:
    """Read the `parameters:` section of a ZenML run configuration file into a `RunConfig`."""
    return _load_parameters(Path(path) if path is not None else embedded_config_path(), RunConfig)


def embedded_grpo_config_path() -> Path:
    """The GRPO configuration `tracesft grpo` uses without `--config`: the demo's registry and tiny model."""
    return Path(str(resources.files("tracesft") / "configs" / "grpo-demo.yaml"))


def load_grpo_config(path: str | Path | None = None) -> GrpoRunConfig:
    """Read the `parameters:` section of a GRPO run configuration file into a `GrpoRunConfig`."""
    return _load_parameters(Path(path) if path is not None else embedded_grpo_config_path(), GrpoRunConfig)


def _load_parameters(path: Path, model: type[_Settings]) -> Any:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TracesftError(f"{path}: configuration file not found.") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise TracesftError(f"{path}: not a readable YAML file; give the path of a run configuration file.") from None
    except yaml.YAMLError as err:
        raise TracesftError(f"{path}: not valid YAML ({err}).") from None
    if not isinstance(document, dict) or not isinstance(document.get("parameters"), dict):
        raise TracesftError(
            f"{path}: expected a ZenML run configuration with a `parameters:` mapping "
            "(see tracesft/configs/demo.yaml for an example)."
        )
    try:
        return model.model_validate(document["parameters"])
    except ValidationError as err:
        problems = "; ".join(
            f"parameters.{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise TracesftError(f"{path}: invalid run configuration: {problems}.") from None


def with_traces(path: str | Path, traces: list[str | Path], destination: Path) -> Path:
    """Write a copy of the run configuration at `path` whose `traces` are replaced; return it.

    Everything else, ZenML settings included, is kept as is, so a scheduled `tracesft retrain`
    runs the very configuration it was given, on the traces folder it was pointed at.
    """
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    document["parameters"]["traces"] = [str(trace) for trace in traces]
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return destination
