"""`tracesft`: the command line of the pipeline and its registry (DESIGN.md §4).

Every command without `--config` uses the embedded default configuration, the one `make demo`
runs, so they all see the same registry. A `TracesftError` (bad input) is printed as one clear
message with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tracesft.config import TrainingRecipe, embedded_config_path, load_run_config, with_training_overrides
from tracesft.errors import TracesftError
from tracesft.tracking import STATE_DIR


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

    run = command("run", _run, "Run the pipeline with a run configuration (ZenML run-config YAML).")
    run.add_argument("--config", type=Path, default=None, help="run configuration (default: the embedded one)")
    run.add_argument("--json", action="store_true", help="print the run summary as JSON")
    recipe_flags = run.add_argument_group("training recipe (overrides the configuration's `training:`)")
    for name, field in TrainingRecipe.model_fields.items():
        recipe_flags.add_argument(f"--{name}", dest=f"recipe_{name}", metavar=_metavar(field.annotation),
                                  help=f"default {field.get_default(call_default_factory=True)!r}")

    tiny = command("tiny-model", _tiny_model, "Build the tiny random-weight Qwen2 model and tokenizer into DIR.")
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
    verify.add_argument("--config", type=Path, default=None, help="for its field_map")
    verify.add_argument("--json", action="store_true")

    adapters = command("adapters", lambda _: parser.error("adapters needs a subcommand"), "Inspect the adapter registry.")
    adapter_commands = adapters.add_subparsers(required=True, metavar="SUBCOMMAND")
    listing = adapter_commands.add_parser("list", help="every registered version, newest first")
    listing.set_defaults(handler=_adapters_list)
    show = adapter_commands.add_parser("show", help="one registered version")
    show.add_argument("version")
    show.set_defaults(handler=_adapters_show)
    for sub in (listing, show):
        sub.add_argument("--config", type=Path, default=None)
        sub.add_argument("--json", action="store_true")
    return parser


def _demo(args: argparse.Namespace) -> int:
    # The demo keeps its ZenML store beside its MLflow database, away from the user's own.
    os.environ.setdefault("ZENML_CONFIG_PATH", str((STATE_DIR / "zenml").resolve()))
    from tracesft.workspace import prepare_demo_workspace

    prepare_demo_workspace()
    return _run_and_report(embedded_config_path(), args.json)


def _metavar(annotation: object) -> str:
    text = str(annotation)
    for kind, metavar in (("list", "A,B,..."), ("bool", "true|false"), ("int", "INT"), ("float", "FLOAT")):
        if kind in text:
            return metavar
    return "VALUE"


def _run(args: argparse.Namespace) -> int:
    config = args.config or embedded_config_path()
    overrides = {name: getattr(args, f"recipe_{name}") for name in TrainingRecipe.model_fields
                 if getattr(args, f"recipe_{name}") is not None}
    if overrides:
        config = with_training_overrides(config, overrides, STATE_DIR / "run-configs")
    load_run_config(config)  # fail fast, with a clear message, before ZenML starts
    return _run_and_report(config, args.json)


def _run_and_report(config: Path, as_json: bool) -> int:
    from pipelines.run import run_pipeline, run_summary
    from tracesft.registry import list_versions
    from tracesft.tracking import resolve_tracking_uri

    settings = load_run_config(config).registry
    summary = run_summary(run_pipeline(config))
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    cached = sum(1 for status in summary["steps"].values() if status == "cached")
    print(f"\nRun {summary['run']}: {summary['status']}, {cached} of {len(summary['steps'])} steps cached.")
    if "registered" in summary:
        registered, decision = summary["registered"], summary["promotion"]
        if summary["new_version"]:
            print(f"Registered {registered['name']} version {registered['version']} (alias challenger).")
        else:
            print(f"Nothing new registered: inputs unchanged, version {registered['version']} still stands.")
        print(f"Promotion gate: {'PROMOTED to champion' if decision['promoted'] else 'not promoted'}: {decision['reason']}.")
        for row in list_versions(settings):
            if row["version"] == registered["version"]:
                metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(row["metrics"].items()) if k.endswith("_f1"))
                print(f"  version {row['version']}: aliases {row['aliases'] or '-'}; {metrics}")
    uri = resolve_tracking_uri(settings)
    print("\nSee the results:")
    print(f"  tracesft adapters list{'' if config == embedded_config_path() else f' --config {config}'}")
    if uri.startswith("sqlite:///"):
        print(f"  MLflow UI:        mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    else:
        print(f"  MLflow UI:        {uri}")
    zenml_config = os.environ.get("ZENML_CONFIG_PATH")
    prefix = f"ZENML_CONFIG_PATH={zenml_config} " if zenml_config else ""
    print(f"  ZenML dashboard:  {prefix}zenml login --local   (runs: {prefix}zenml pipeline runs list)")
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from tracesft.sample_data import tokenizer_corpus
    from tracesft.tiny_model import build_tiny_model

    print(build_tiny_model(args.dir, tokenizer_corpus(), seed=args.seed))
    return 0


def _parse_answer(args: argparse.Namespace) -> int:
    from tracesft.answers import extract_answer

    print(extract_answer(sys.stdin.read()))
    return 0


def _score(args: argparse.Namespace) -> int:
    from tracesft.scoring import score_file

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
    from tracesft.ingest import ingest
    from tracesft.verify import verify

    field_map = load_run_config(args.config).field_map if args.config else {}
    batch = ingest(args.files, field_map)
    result = verify(batch)
    report = {
        "records": len(batch.records),
        "kept": len(result.kept.records),
        "rejected": result.rejected_by_reason(),
        "content_hash": batch.content_hash,
        "rejections": [{"where": r.record.where, "reason": r.reason, "detail": r.detail} for r in result.rejected],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['records']} records: {report['kept']} kept, {len(result.rejected)} rejected")
        for rejection in report["rejections"]:
            print(f"  {rejection['where']}: {rejection['reason']} ({rejection['detail']})")
    return 0


def _adapters_list(args: argparse.Namespace) -> int:
    from tracesft.registry import list_versions

    rows = list_versions(load_run_config(args.config).registry)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif not rows:
        print("No adapter registered yet (run `make demo` or `tracesft run`).")
    for row in [] if args.json else rows:
        f1 = row["metrics"].get("finetuned_f1")
        print(f"{row['name']} v{row['version']}  aliases={','.join(row['aliases']) or '-'}  "
              f"finetuned_f1={'-' if f1 is None else f'{f1:.3f}'}  base={row['tags'].get('base_model', '-')}")
    return 0


def _adapters_show(args: argparse.Namespace) -> int:
    from tracesft.registry import list_versions

    settings = load_run_config(args.config).registry
    match = [row for row in list_versions(settings) if row["version"] == args.version]
    if not match:
        raise TracesftError(f"{settings.model_name} has no version {args.version!r}; see `tracesft adapters list`.")
    print(json.dumps(match[0], indent=2, default=str) if args.json else _pretty(match[0]))
    return 0


def _pretty(row: dict) -> str:
    lines = [f"{row['name']} version {row['version']}", f"  aliases: {', '.join(row['aliases']) or '-'}", "  tags:"]
    lines += [f"    {k}: {v}" for k, v in sorted(row["tags"].items())]
    lines += ["  metrics:"] + [f"    {k}: {v:.4f}" for k, v in sorted(row["metrics"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
