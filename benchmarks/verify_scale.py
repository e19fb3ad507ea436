"""Verification at scale: ingest and verify 100,000 GPT-style records in under 60 seconds.

What is timed is what `tracesft verify-traces DIR` does: stream the JSONL result files, read every
record, extract each answer from its trace, and check each problem's gold label with the exact
solver, whose results are cached per distinct problem. The records are generated first (not
timed): `--problems` distinct Corr2Cause-style problems of 2-6 variables, each answered
`--records / --problems` times by synthetic traces with `--wrong-share` of them wrong, split over
`--files` JSONL files, like repeated GPT evaluation runs dropped into one folder.

    python benchmarks/verify_scale.py                      # 100,000 records, 5,000 problems
    python benchmarks/verify_scale.py --records 20000 --no-record

The table is printed, and (unless --no-record) appended to BENCHMARKS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's tracesft, not an installed one

from tracesft.data.generator import generate_problems, synthetic_predictions, write_jsonl
from tracesft.data.ingest import ingest
from tracesft.data.solver import clear_caches, equivalence_class
from tracesft.data.verify import verify

BUDGET_SECONDS = 60.0
BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = """# Benchmarks

Speed and memory claims of tracesft, each measured by a script in `benchmarks/` that prints its
table and appends it here with the machine and the date. Newest last.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--problems", type=int, default=5_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--wrong-share", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tracesft-verify-scale-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        problems = generate_problems(args.problems, seed=args.seed, positive_share=0.15)
        repeats = -(-args.records // args.problems)
        # Repeated runs over the same problems; each run's traces are its own text, as GPT's are.
        stream = (
            r | {"response": f"(evaluation run {i + 1})\n{r['response']}"}
            for i in range(repeats)
            for r in synthetic_predictions(problems, args.wrong_share, seed=args.seed + i)
        )
        per_file = -(-args.records // args.files)
        written = 0
        for index in range(args.files):
            count = min(per_file, args.records - written)
            written += write_jsonl(folder / f"gpt_run_{index:02d}.jsonl", (next(stream) for _ in range(count)))
        generated_s = time.perf_counter() - started
        size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6

        clear_caches()  # the solver starts cold, as in a fresh process
        started, started_cpu = time.perf_counter(), time.process_time()
        batch = ingest([str(folder)])
        ingested_s = time.perf_counter() - started
        result = verify(batch)
        total_s, total_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
        solved = equivalence_class.cache_info().misses

    rows = [
        ("records", f"{len(batch.records):,}"),
        ("files (JSONL)", f"{len(batch.files)} ({size_mb:,.0f} MB)"),
        ("problems generated / distinct premises solved", f"{args.problems:,} / {solved:,}"),
        ("kept", f"{len(result.kept.records):,}"),
        ("rejected", ", ".join(f"{k} {v:,}" for k, v in result.rejected_by_reason().items()) or "-"),
        ("ingest (stream + parse + records)", f"{ingested_s:.1f} s"),
        ("verify (answers + solver + duplicates)", f"{total_s - ingested_s:.1f} s"),
        ("ingest + verify", f"{total_s:.1f} s ({len(batch.records) / total_s:,.0f} records/s)"),
        ("ingest + verify, CPU time of this process", f"{total_cpu_s:.1f} s (wall above includes other load on the machine)"),
        ("budget", f"{BUDGET_SECONDS:.0f} s: {'met' if total_s < BUDGET_SECONDS else 'MISSED'} ({total_s / BUDGET_SECONDS:.2f} of it)"),
        ("data generation (not timed above)", f"{generated_s:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(["| measure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if not args.no_record:
        text = BENCHMARKS_MD.read_text(encoding="utf-8") if BENCHMARKS_MD.exists() else HEADER
        text += (
            f"\n## verify_scale: {args.records:,} records ({date.today().isoformat()}, {args.machine})\n\n"
            f"`python benchmarks/verify_scale.py --records {args.records} --problems {args.problems} "
            f"--files {args.files} --wrong-share {args.wrong_share}`\n\n{table}\n"
        )
        BENCHMARKS_MD.write_text(text, encoding="utf-8")
        print(f"\nappended to {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
