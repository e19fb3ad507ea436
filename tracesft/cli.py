"""`tracesft`: the command line of the pipeline and its registry (docs/architecture.md).

Every command without `--config` uses the embedded default configuration, the one `make demo`
runs, so they all see the same registry. A `TracesftError` (bad input) is printed as one clear
message with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from tracesft.config import (
    RegistrySettings,
    TrainingRecipe,
    embedded_config_path,
    embedded_grpo_config_path,
    load_grpo_config,
    load_run_config,
    with_traces,
    with_training_overrides,
)
from tracesft.device import require_device
from tracesft.errors import TracesftError
from tracesft.workspace import state_dir, use_workspace_zenml_store


DEBUG_HELP = "show ZenML's full output and tracebacks when a step fails"

# Every scalar or list field of the recipe is a flag; nested settings (`distributed`) stay in the YAML.
RECIPE_FLAGS = {name: field for name, field in TrainingRecipe.model_fields.items()
                if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except TracesftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracesft", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    demo = command("demo", _demo, "Run the whole pipeline on the embedded default (CPU, tiny model, sample traces).")
    demo.add_argument("--json", action="store_true", help="print the run summary as JSON")
    demo.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    run = command("run", _run, "Run the pipeline with a run configuration (ZenML run-config YAML).")
    run.add_argument("--config", type=Path, default=None, help="run configuration (default: the embedded one)")
    run.add_argument("--json", action="store_true", help="print the run summary as JSON")
    run.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    recipe_flags = run.add_argument_group("training recipe (overrides the configuration's `training:`)")
    for name, field in RECIPE_FLAGS.items():
        recipe_flags.add_argument(f"--{name}", dest=f"recipe_{name}", metavar=_metavar(field.annotation),
                                  help=f"default {field.get_default(call_default_factory=True)!r}")

    retrain = command(
        "retrain",
        _retrain,
        "Rerun the pipeline on a traces folder, e.g. from cron: unchanged traces come from the cache and "
        "register nothing; a new or changed file retrains and registers a new version.",
    )
    retrain.add_argument("--traces", type=Path, required=True, help="folder of GPT result files (overrides the configured traces)")
    retrain.add_argument("--config", type=Path, default=None, help="run configuration (default: the embedded one)")
    retrain.add_argument("--json", action="store_true", help="print the run summary as JSON")
    retrain.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    grpo = command(
        "grpo",
        _grpo,
        "Continue a registered adapter (default: champion) with GRPO on fresh problems, the solver verifying "
        "the reward; register the result as its child and let the gate decide.",
    )
    grpo.add_argument("--config", type=Path, default=None, help="GRPO run configuration (default: the embedded one)")
    grpo.add_argument("--json", action="store_true", help="print the run summary as JSON")
    grpo.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    tiny = command("tiny-model", _tiny_model, "Build the tiny random-weight Qwen2 model and tokenizer into DIR (new or empty).")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)

    command("parse-answer", _parse_answer, "Read one model output on stdin; print yes, no or none.")

    score = command("score", _score, "Score raw model outputs (JSONL: input, output) against a Corr2Cause CSV.")
    score.add_argument("--gold", type=Path, required=True, help="Corr2Cause CSV: input,label,num_variables,template")
    score.add_argument("--predictions", type=Path, required=True, help="JSONL, one {\"input\": ..., \"output\": ...} a line")
    score.add_argument("--allow-missing", action="store_true", help="score only the gold problems that have a prediction")
    score.add_argument("--json", action="store_true")

    verify = command("verify-traces", _verify_traces, "Verify GPT result files; count kept and rejected traces.")
    verify.add_argument("files", nargs="+")
    verify.add_argument("--config", type=Path, default=None, help="for its field_map and on_bad_record")
    verify.add_argument(
        "--on-bad-record", choices=("error", "skip"), default=None, help="stop at an unreadable record, or skip and list it"
    )
    verify.add_argument("--json", action="store_true")

    solve = command("solve", _solve, "Run the exact Corr2Cause solver on a CSV; report agreement with its gold labels.")
    solve.add_argument("csv", type=Path)
    solve.add_argument("--json", action="store_true")

    adapters = command("adapters", lambda _: parser.error("adapters needs a subcommand"), "Inspect the adapter registry, promote, roll back, export.")
    adapter_commands = adapters.add_subparsers(required=True, metavar="SUBCOMMAND")
    listing = adapter_commands.add_parser("list", help="every registered version, newest first")
    listing.set_defaults(handler=_adapters_list)
    show = adapter_commands.add_parser("show", help="one registered version, by number or alias")
    show.add_argument("version", help="a version number or an alias (champion, challenger)")
    show.set_defaults(handler=_adapters_show)
    promote = adapter_commands.add_parser(
        "promote", help="make VERSION champion (refused without a completed evaluation or for another base model)"
    )
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="promote even without evaluation or across base models")
    promote.add_argument("--reason", default="", help="why, for the champion history")
    promote.set_defaults(handler=_adapters_promote)
    rollback = adapter_commands.add_parser("rollback", help="give champion back to the version that held it before")
    rollback.add_argument("--reason", default="", help="why, for the champion history")
    rollback.set_defaults(handler=_adapters_rollback)
    history = adapter_commands.add_parser("history", help="every change of champion, oldest first")
    history.set_defaults(handler=_adapters_history)
    export = adapter_commands.add_parser(
        "export", help="write the adapter and the exact base it was evaluated on; --merged: one merged model, measured"
    )
    export.add_argument("version", help="a version number or an alias (champion, challenger)")
    export.add_argument("out", type=Path, nargs="?", default=None, help="a new directory for the export")
    export.add_argument("--merged", type=Path, nargs="?", const=True, default=None, metavar="OUT",
                        help="write base + adapter merged instead (refused when its logits move from the evaluated "
                             "adapter's by more than registry.max_merged_logit_deviation); OUT may be given here")
    export.add_argument("--base-model", default=None, help="with --merged: the base model here, if not where the adapter records it")
    export.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="with --merged")
    export.set_defaults(handler=_adapters_export)
    for sub in (listing, show, promote, rollback, history, export):
        sub.add_argument("--config", type=Path, default=None)
        sub.add_argument("--json", action="store_true")
    return parser


def _demo(args: argparse.Namespace) -> int:
    return _run_and_report(embedded_config_path(), args, embedded_config_path())


def failure_log() -> Path:
    """Where the traceback of a run that failed for a reason other than its input is kept."""
    return state_dir() / "logs" / "last-failure.log"


def _use_state_of(config: Path | None) -> None:
    """Find the state of `config` (None: the embedded default) as every command finds it.

    The embedded default's files are laid out in the workspace and its ZenML store is the
    workspace's (`tracesft.workspace.use_workspace_zenml_store`); a given configuration uses the
    active ZenML store, as `zenml pipeline run -c FILE` does.
    """
    if config is None or config == embedded_config_path():
        use_workspace_zenml_store()
        from tracesft.workspace import prepare_demo_workspace

        prepare_demo_workspace()


def _registry_of(args: argparse.Namespace) -> RegistrySettings:
    """The registry an `adapters` command reads, which must exist already."""
    from tracesft.train.tracking import existing_tracking_uri

    settings = load_run_config(args.config).registry
    existing_tracking_uri(settings)
    return settings


def _grpo(args: argparse.Namespace) -> int:
    from pipelines.run import run_grpo_pipeline, run_summary

    if args.config is None:
        _use_state_of(None)  # the demo's workspace, registry and ZenML store
    config = args.config or embedded_grpo_config_path()
    require_device(load_grpo_config(config).device, str(config))  # fail fast, before ZenML starts
    summary = _run_reporting_failures(args, lambda: run_summary(run_grpo_pipeline(config)))
    if isinstance(summary, int):  # the run failed and said so: its exit code
        return summary
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    grpo, registered, decision = summary.get("grpo", {}), summary["registered"], summary["promotion"]
    print(f"\nRun {summary['run']}: {summary['status']}; GRPO {grpo.get('steps')} steps on {grpo.get('problems')} "
          f"problems, mean reward {grpo.get('first_reward', 0):.3f} at the first step, {grpo.get('last_reward', 0):.3f} at the last.")
    print(f"Registered {registered['name']} version {registered['version']} (alias challenger, stage grpo).")
    print(f"Promotion gate: {'PROMOTED to champion' if decision['promoted'] else 'not promoted'}: {decision['reason']}.")
    return 0


def _metavar(annotation: object) -> str:
    text = str(annotation)
    for kind, metavar in (("list", "A,B,..."), ("bool", "true|false"), ("int", "INT"), ("float", "FLOAT")):
        if kind in text:
            return metavar
    return "VALUE"


def _run(args: argparse.Namespace) -> int:
    config = args.config or embedded_config_path()
    overrides = {name: getattr(args, f"recipe_{name}") for name in RECIPE_FLAGS
                 if getattr(args, f"recipe_{name}") is not None}
    if overrides:
        config = with_training_overrides(config, overrides, state_dir() / "run-configs")
    load_run_config(config)  # fail fast, with a clear message, before ZenML starts
    return _run_and_report(config, args, args.config or embedded_config_path())


def _retrain(args: argparse.Namespace) -> int:
    if not args.traces.exists():
        raise TracesftError(
            f"{args.traces}: no such file or folder; give the folder where new GPT result files arrive (or one such file)."
        )
    if args.config is None:
        _use_state_of(None)
    source = args.config or embedded_config_path()
    # Fail fast, with a clear message, before ZenML starts or anything is written.
    require_device(load_run_config(source).device, str(source))
    # Kept beside the other derived configurations rather than in a temporary folder: ZenML and
    # every message may name it, and it must still be there when the user looks.
    config = with_traces(source, [args.traces.resolve()], state_dir() / "run-configs" / f"{source.stem}.retrain.yaml")
    return _run_and_report(config, args, source)


def _run_and_report(config: Path, args: argparse.Namespace, shown_config: Path) -> int:
    """Run the pipeline on `config` (possibly a derived copy of the user's `shown_config`) and report
    on stdout: the summary, or with `--json` one JSON document; everything else goes to stderr."""
    from pipelines.run import run_pipeline, run_summary
    from tracesft.registry.model_registry import list_versions

    run_config = load_run_config(config)
    require_device(run_config.device, str(shown_config))  # before ZenML starts, not in its first GPU step
    _use_state_of(shown_config)

    def run_and_summarize() -> dict:
        summary = run_summary(run_pipeline(config))
        if "registered" in summary:
            version = summary["registered"]["version"]
            summary["registered"]["aliases"] = next(
                (row["aliases"] for row in list_versions(run_config.registry) if row["version"] == version), []
            )
        return summary

    summary = _run_reporting_failures(args, run_and_summarize)
    if isinstance(summary, int):  # the run failed and said so: its exit code
        return summary
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        _print_run_summary(summary, run_config, shown_config)
    return 0


def _run_reporting_failures(args: argparse.Namespace, run_and_summarize: Callable[[], dict]) -> dict | int:
    """The summary `run_and_summarize` returns (a pipeline run's), with everything the run prints
    sent to stderr; or, when it fails, its exit code (2: its input caused it) after one `error:`
    line naming the step (the traceback goes to the failure log, or is raised with `--debug`) and,
    with `--json`, one JSON document saying so on stdout. Every command that runs a pipeline
    reports through here, so they all fail alike."""
    from tracesft.console import failure_message, quiet_step_failures, stdout_to_stderr

    with stdout_to_stderr(), quiet_step_failures(args.debug) as failure:
        try:
            return run_and_summarize()
        except Exception as error:
            if args.debug:
                raise
            message, caused_by_input = failure_message(error, failure.step, failure_log()), isinstance(error, TracesftError)
    print(f"error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"status": "failed", "step": failure.step, "error": message}, indent=2))
    return 2 if caused_by_input else 1


def _print_run_summary(summary: dict, run_config, shown_config: Path) -> None:
    """The run's story in the order it happened: data in, data kept, scores, the gate, the registry."""
    from tracesft.train.tracking import resolve_tracking_uri

    cached = sum(1 for status in summary["steps"].values() if status == "cached")
    print(f"\nRun {summary['run']}: {summary['status']}, {cached} of {len(summary['steps'])} steps cached.")
    _print_data_summary(summary)
    if "evaluation" in summary:
        evaluation = summary["evaluation"]
        gain = evaluation["f1_difference"]
        print(f"Evaluation on {evaluation['problems']} held-out problems: base F1 {evaluation['base_f1']:.3f}, "
              f"fine-tuned F1 {evaluation['finetuned_f1']:.3f}; gain {gain['observed']:+.3f}, "
              f"{gain['confidence']:.0%} interval [{gain['low']:+.3f}, {gain['high']:+.3f}].")
    if "registered" in summary:
        registered, decision = summary["registered"], summary["promotion"]
        print(f"Promotion gate: {'PROMOTED to champion' if decision['promoted'] else 'not promoted'}: {decision['reason']}.")
        news = "registered" if summary["new_version"] else "found in the registry (same adapter content): nothing new registered"
        print(f"Registry: {registered['name']} version {registered['version']} {news}; "
              f"aliases: {', '.join(registered['aliases']) or 'none'}.")
    config = "" if shown_config == embedded_config_path() else f" --config {shown_config}"
    uri = resolve_tracking_uri(run_config.registry)
    print("\nLook next:")
    print(f"  {_runnable('tracesft')} adapters list{config}")
    if uri.startswith("sqlite:///"):
        print(f"  {_runnable('mlflow')} ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    else:
        print(f"  MLflow: {uri}")
    zenml_config = os.environ.get("ZENML_CONFIG_PATH")
    prefix = f"ZENML_CONFIG_PATH={zenml_config} " if zenml_config else ""
    print(f"  {prefix}{_runnable('zenml')} pipeline runs list")


def _runnable(program: str) -> str:
    """How to start `program` of this environment from the user's shell: its bare name when PATH
    finds this very copy (an activated venv), else its path (`.venv/bin/tracesft` after `make demo`)."""
    here = Path(sys.executable).parent / program
    found = shutil.which(program)
    if found and Path(found).resolve() == here.resolve():
        return program
    return os.path.relpath(here) if here.is_relative_to(Path.cwd()) else str(here)


def _print_data_summary(summary: dict) -> None:
    """What the run's training data was made of, and every record and file it left out."""
    if "ingestion" in summary:
        ingestion = summary["ingestion"]
        skipped, ignored = ingestion["skipped_records"], ingestion["ignored_files"]
        print(f"Traces: {ingestion['records'] + skipped} records read from {ingestion['files']} file(s)"
              + (f"; {skipped} unreadable record(s) skipped (on_bad_record: skip):" if skipped else "."))
        # Each message already names its file and line or record.
        _print_listed([s["error"] for s in ingestion.get("skipped_records_listed", [])], skipped)
        if ignored:
            print(f"{ignored} path(s) in the traces folders not read:")
            _print_listed([f"{i['path']}: {i['reason']}" for i in ingestion.get("ignored_files_listed", [])], ignored)
    if "verification" in summary:
        verification = summary["verification"]
        rejected = verification["rejected"]
        reasons = ", ".join(f"{reason} {count}" for reason, count in rejected.items())
        print(f"Verified: {verification['kept']} of {verification['records']} kept, {sum(rejected.values())} rejected"
              + (f" ({reasons})." if rejected else "."))
    if "sft_dataset" in summary:
        print(f"SFT dataset: {summary['sft_dataset']['train']} train, {summary['sft_dataset']['validation']} validation records.")


def _print_listed(lines: list[str], total: int) -> None:
    for line in lines:
        print(f"  {line}")
    if total > len(lines):
        print(f"  ... and {total - len(lines)} more: all are listed in the run's sft_dataset_summary and raw_traces artifacts.")


def _tiny_model(args: argparse.Namespace) -> int:
    from tracesft.data.sample_data import tokenizer_corpus
    from tracesft.train.tiny_model import build_tiny_model
    from tracesft.user_paths import require_new_folder

    require_new_folder(args.dir, "tiny model")
    print(build_tiny_model(args.dir, tokenizer_corpus(), seed=args.seed))
    return 0


def _parse_answer(args: argparse.Namespace) -> int:
    from tracesft.data.answers import extract_answer

    print(extract_answer(sys.stdin.read()))
    return 0


def _score(args: argparse.Namespace) -> int:
    from tracesft.evaluate.scoring import score_file

    report = score_file(args.gold, args.predictions, args.allow_missing)
    if args.json:
        print(json.dumps(report.model_dump(), indent=2))
        return 0
    print(f"{report.n} problems: F1 {report.f1:.3f}, precision {report.precision:.3f}, recall {report.recall:.3f}, "
          f"accuracy {report.accuracy:.3f}, parse failures {report.parse_failure_rate:.1%}")
    for title, groups in (("template", report.by_template), ("variables", report.by_num_variables)):
        for name, scores in groups.items():
            print(f"  {title} {name}: n {scores.n}, F1 {scores.f1:.3f}, accuracy {scores.accuracy:.3f}")
    return 0


def _verify_traces(args: argparse.Namespace) -> int:
    from tracesft.data.ingest import ingest
    from tracesft.data.verify import verify

    config = load_run_config(args.config) if args.config else None
    field_map = config.field_map if config else {}
    on_bad_record = args.on_bad_record or (config.on_bad_record if config else "error")
    batch = ingest(args.files, field_map, on_bad_record)
    result = verify(batch)
    report = {
        "records": len(batch.records),
        "kept": len(result.kept.records),
        "rejected": result.rejected_by_reason(),
        "skipped": [{"where": f"{s.source} ({s.locator})", "error": s.error} for s in batch.skipped],
        "ignored": [i.model_dump() for i in batch.ignored],
        "content_hash": batch.content_hash,
        "rejections": [{"where": r.record.where, "reason": r.reason, "detail": r.detail} for r in result.rejected],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['records']} records: {report['kept']} kept, {len(result.rejected)} rejected")
        for rejection in report["rejections"]:
            print(f"  {rejection['where']}: {rejection['reason']} ({rejection['detail']})")
        if batch.skipped:
            print(f"{len(batch.skipped)} unreadable record(s) skipped:")
            for skipped in report["skipped"]:
                print(f"  {skipped['where']}: {skipped['error']}")
        if batch.ignored:
            print(f"{len(batch.ignored)} path(s) in the given folders not read:")
            for ignored in batch.ignored:
                print(f"  {ignored.path}: {ignored.reason}")
    return 0


def _solve(args: argparse.Namespace) -> int:
    from tracesft.evaluate.eval_set import load_eval_set
    from tracesft.data.solver import agreement_report

    started = time.perf_counter()
    report = agreement_report(load_eval_set(args.csv))
    report["seconds"] = round(time.perf_counter() - started, 3)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['rows']} rows ({report['distinct_premises']} distinct premises) in {report['seconds']} s: "
          f"{report['agree']} agree with gold, {len(report['disagree'])} disagree, {len(report['malformed'])} unreadable")
    for row in report["disagreements"]:
        print(f"  line {row['line']} ({row['template']}): gold {row['gold']}, solver {row['solver']}: {row['derived']}")
    for row in report["malformed_rows"]:
        print(f"  line {row['line']} ({row['template']}): {row['error']}")
    return 0


def _adapters_list(args: argparse.Namespace) -> int:
    from tracesft.registry.model_registry import list_versions

    settings = _registry_of(args)
    rows = list_versions(settings)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif not rows:
        print(f"No adapter registered in {settings.model_name} yet (run `make demo` or `tracesft run`).")
    else:
        print(f"{settings.model_name}, newest first:")
        print(f"{'version':>7}  {'registered (UTC)':<16}  {'base F1':>7}  {'fine-tuned F1':>13}  aliases")
        for row in rows:
            print(f"{row['version']:>7}  {_utc_minute(row['created']):<16}  {_f1(row, 'base_f1'):>7}  "
                  f"{_f1(row, 'finetuned_f1'):>13}  {', '.join(row['aliases']) or '-'}")
    return 0


def _utc_minute(epoch_ms: int | None) -> str:
    from datetime import datetime, timezone

    return "-" if epoch_ms is None else datetime.fromtimestamp(epoch_ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")


def _f1(row: dict, metric: str) -> str:
    value = row["metrics"].get(metric)
    return "-" if value is None else f"{value:.3f}"


def _adapters_show(args: argparse.Namespace) -> int:
    from tracesft.registry.model_registry import list_versions

    settings = _registry_of(args)
    # A version number or an alias, as `export` takes them.
    match = [row for row in list_versions(settings) if args.version in (row["version"], *row["aliases"])]
    if not match:
        raise TracesftError(
            f"{settings.model_name} has no version or alias {args.version!r}; see `tracesft adapters list`."
        )
    print(json.dumps(match[0], indent=2, default=str) if args.json else _pretty(match[0]))
    return 0


def _adapters_promote(args: argparse.Namespace) -> int:
    from tracesft.registry.model_registry import promote_version

    settings = _registry_of(args)
    change = promote_version(settings, args.version, force=args.force, reason=args.reason)
    return _report_change(settings, change, args.json)


def _adapters_rollback(args: argparse.Namespace) -> int:
    from tracesft.registry.model_registry import rollback_champion

    settings = _registry_of(args)
    return _report_change(settings, rollback_champion(settings, reason=args.reason), args.json)


def _report_change(settings, change, as_json: bool) -> int:
    if as_json:
        print(json.dumps(change.model_dump() | {"name": settings.model_name}, indent=2))
    else:
        print(f"{settings.model_name}: champion is now version {change.version} "
              f"(was {change.previous or 'none'}; {change.action}{', forced' if change.forced else ''}: {change.reason}).")
    return 0


def _adapters_history(args: argparse.Namespace) -> int:
    from tracesft.registry.model_registry import champion_history

    history = champion_history(_registry_of(args))
    if args.json:
        print(json.dumps([change.model_dump() for change in history], indent=2))
    elif not history:
        print("No champion yet.")
    for change in [] if args.json else history:
        print(f"#{change.seq} {change.time}  {change.action:<8} v{change.previous or '-'} -> v{change.version}"
              f"{'  (forced)' if change.forced else ''}  {change.reason}")
    return 0


def _adapters_export(args: argparse.Namespace) -> int:
    from tracesft.registry.serving import export_registered

    merged = args.merged is not None
    outs = [out for out in (args.out, None if args.merged is True else args.merged) if out is not None]
    if len(outs) != 1:
        raise TracesftError("give one output folder: `adapters export VERSION OUT [--merged]` (or the older `--merged OUT`).")
    run_config = load_run_config(args.config)  # the registry's existence is checked after the output folder's
    require_device(run_config.device, str(args.config or embedded_config_path()))
    settings = run_config.registry
    report = export_registered(settings, args.version, outs[0], run_config.device, merged, args.base_model, args.dtype)
    if args.json:
        print(json.dumps(report))
    elif merged:
        print(f"Merged {settings.model_name} version {report['version']} ({args.dtype}) into {outs[0]}; logits within "
              f"{report['max_logit_deviation']:.2e} (relative) of the evaluated adapter, recorded on the version.")
    else:
        print(f"Exported {settings.model_name} version {report['version']} into {outs[0]}: the adapter and its base "
              f"{report['base_model']} (see {outs[0] / 'tracesft_export.json'}).")
    return 0


def _pretty(row: dict) -> str:
    lines = [f"{row['name']} version {row['version']}", f"  registered: {_utc_minute(row['created'])} UTC",
             f"  aliases: {', '.join(row['aliases']) or '-'}", "  tags:"]
    lines += [f"    {k}: {v}" for k, v in sorted(row["tags"].items())]
    lines += ["  metrics:"] + [f"    {k}: {v:.4f}" for k, v in sorted(row["metrics"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
