"""Evaluation: the eval sets, batched generation (OOM back-off, resumable cache), fast inference,
the paired bootstrap, the comparison report and its MLflow record."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from tracesft.config import EvalSettings, TrainingRecipe
from tracesft.errors import TracesftError
from tracesft.evaluate.eval_set import EvalProblem, load_eval_set, renamed_problems, stratified_sample, validation_problems
from tracesft.generate.batching import GenerationCache, cache_key, generate_all, generation_signature
from tracesft.evaluate.metrics import paired_bootstrap_f1_difference, scores
from tracesft.data.sample_data import DATA, EVAL_CSV, tokenizer_corpus
from tracesft.data.sft_dataset import SFTDataset
from tracesft.data.traces import TraceRecord
from tracesft.evaluate.variable_renaming import declared_variables, rename_variables

EVAL_PATH = Path(str(DATA / EVAL_CSV))
QUERY = (
    "Premise: Suppose there is a closed system of 3 variables, A, B and C. All the statistical relations among "
    "these 3 variables are as follows: A correlates with C. B correlates with C. However, A is independent of B.\n"
    "Hypothesis: There exists at least one collider (i.e., common effect) of A and B."
)


# --- paired bootstrap ------------------------------------------------------------------------


def test_bootstrap_observed_is_the_f1_difference() -> None:
    labels = [1, 1, 1, 0, 0, 0, 1, 0]
    base = ["yes", "no", "no", "yes", "no", "none", "none", "no"]
    tuned = ["yes", "yes", "no", "yes", "no", "no", "yes", "no"]
    interval = paired_bootstrap_f1_difference(labels, base, tuned, n_resamples=2000, seed=1)
    assert interval.observed == pytest.approx(scores(labels, tuned).f1 - scores(labels, base).f1)
    assert interval.low <= interval.observed <= interval.high
    assert interval.n == 8 and interval.n_resamples == 2000 and interval.confidence == 0.95
    assert paired_bootstrap_f1_difference(labels, base, tuned, n_resamples=2000, seed=1) == interval


def test_bootstrap_hand_computed_distribution() -> None:
    # Two valid problems; base says no to both, tuned says yes to the first. A resample draws the
    # first problem twice (p 1/4: tuned F1 1), once (p 1/2: tp 1, fn 1, F1 2/3) or never (p 1/4: 0);
    # base F1 is always 0. So the 30th and 70th percentiles of the difference are both 2/3,
    # and the 95% interval spans [0, 1].
    labels, base, tuned = [1, 1], ["no", "no"], ["yes", "no"]
    middle = paired_bootstrap_f1_difference(labels, base, tuned, n_resamples=4000, confidence=0.4, seed=0)
    assert middle.observed == pytest.approx(2 / 3)
    assert middle.low == pytest.approx(2 / 3) and middle.high == pytest.approx(2 / 3)
    wide = paired_bootstrap_f1_difference(labels, base, tuned, n_resamples=4000, confidence=0.95, seed=0)
    assert (wide.low, wide.high) == (pytest.approx(0.0), pytest.approx(1.0))


def test_bootstrap_identical_models_and_a_sure_win() -> None:
    same = paired_bootstrap_f1_difference([1, 0, 1], ["yes", "no", "none"], ["yes", "no", "none"], n_resamples=500)
    assert (same.low, same.observed, same.high) == (0.0, 0.0, 0.0)
    sure = paired_bootstrap_f1_difference([1], ["no"], ["yes"], n_resamples=100)
    assert (sure.low, sure.observed, sure.high) == (1.0, 1.0, 1.0)


def test_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="one answer per label"):
        paired_bootstrap_f1_difference([1, 0], ["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="at least one problem"):
        paired_bootstrap_f1_difference([], [], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_f1_difference([1], ["yes"], ["yes"], confidence=1.0)


# --- eval sets -------------------------------------------------------------------------------


def _problems(strata: dict[tuple[str, int], int]) -> list[EvalProblem]:
    items = [(t, label) for (t, label), count in strata.items() for _ in range(count)]
    return [EvalProblem(query=f"q{i}", label=label, num_variables=3, template=t, row=i) for i, (t, label) in enumerate(items)]


def test_stratified_sample_keeps_the_mix() -> None:
    problems = _problems({("parent", 1): 30, ("parent", 0): 10, ("child", 0): 50, ("child", 1): 10})
    sample = stratified_sample(problems, 20, seed=3)
    assert len(sample) == 20 and len({p.row for p in sample}) == 20
    # Quotas 6, 2, 10, 2: whole numbers, so exactly proportional.
    assert Counter((p.template, p.label) for p in sample) == {("parent", 1): 6, ("parent", 0): 2, ("child", 0): 10, ("child", 1): 2}
    assert [p.row for p in sample] == sorted(p.row for p in sample)
    assert stratified_sample(problems, 20, seed=3) == sample
    assert stratified_sample(problems, 20, seed=4) != sample
    assert stratified_sample(problems, 1000, seed=3) == problems


def test_stratified_sample_gives_leftover_seats_to_largest_remainders() -> None:
    problems = _problems({("a", 0): 5, ("b", 0): 3, ("c", 0): 2})
    # Quotas for 5 of 10: 2.5, 1.5, 1.0 -> floors 2, 1, 1, one seat left, remainders tie at .5 for a and b.
    counts = Counter(p.template for p in stratified_sample(problems, 5, seed=0))
    assert sum(counts.values()) == 5 and counts["c"] == 1 and {counts["a"], counts["b"]} in ({3, 1}, {2, 2})


def test_rename_variables_only_renames_declared_variable_tokens() -> None:
    renamed = rename_variables(QUERY)
    assert renamed.startswith("Premise: Suppose there is a closed system of 3 variables, Z, Y and X. All the statistical")
    assert "Z correlates with X. Y correlates with X. However, Z is independent of Y." in renamed
    assert renamed.endswith("Hypothesis: There exists at least one collider (i.e., common effect) of Z and Y.")
    assert declared_variables(renamed) == ["Z", "Y", "X"]
    assert rename_variables(renamed) == QUERY  # the mirror is its own inverse
    # An undeclared capital stays; capitals inside words are never touched.
    assert rename_variables(QUERY.replace("of A and B.", "of A and B in Q.")).endswith("of Z and Y in Q.")


def test_rename_variables_needs_a_declaration() -> None:
    with pytest.raises(TracesftError, match="declares no variables") as excinfo:
        rename_variables("Premise: A correlates with B.\nHypothesis: A causes B.", where="eval.csv (data row 4)")
    assert "eval.csv (data row 4)" in str(excinfo.value) and "renamed_variables" in str(excinfo.value)


def test_renamed_problems_keep_labels_and_rows() -> None:
    problems = load_eval_set(EVAL_PATH)
    renamed = renamed_problems(problems)
    assert [(p.row, p.label, p.template) for p in renamed] == [(p.row, p.label, p.template) for p in problems]
    assert all(a.query != b.query for a, b in zip(problems, renamed))


def test_validation_problems_read_template_and_size_from_the_text() -> None:
    def record(query: str, gold: int) -> TraceRecord:
        return TraceRecord(query=query, trace="t", gold=gold, source="f.jsonl", locator="line 1")

    direct = QUERY.replace("There exists at least one collider (i.e., common effect) of A and B.", "A directly causes C.")
    odd = "Premise: something else.\nHypothesis: nothing known."
    dataset = SFTDataset(
        train=[], validation=[record(QUERY, 1), record(QUERY, 1), record(direct, 0), record(odd, 0)],
        content_hash="h", validation_fraction=0.5, seed=0,
    )
    problems = validation_problems(dataset)
    assert [(p.row, p.template, p.num_variables, p.label) for p in problems] == [
        (0, "has_collider", 3, 1), (1, "parent or child", 3, 0), (2, "unknown", 0, 0),
    ]


# --- batched generation: back-off and resumption ---------------------------------------------


class FakeGenerator:
    """A static-batch decoder that records batch sizes, runs out of memory above `limit` prompts
    and (optionally) is interrupted after `stop_after` successful batches."""

    def __init__(self, limit: int = 1000, stop_after: int | None = None) -> None:
        self.limit, self.stop_after = limit, stop_after
        self.attempts: list[int] = []
        self.generated: list[list[int]] = []

    def __call__(self, prompts: list[list[int]], limits: list[int], concurrency: int, finished) -> None:
        for start in range(0, len(prompts), concurrency):
            batch = prompts[start : start + concurrency]
            self.attempts.append(len(batch))
            if len(batch) > self.limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            if self.stop_after is not None and len(self.generated) >= self.stop_after:
                raise KeyboardInterrupt
            self.generated.append([p[0] for p in batch])
            for offset, prompt in enumerate(batch):
                finished(start + offset, f"out {prompt[0]}")


def _prompts(n: int) -> list[list[int]]:
    return [[i] * (1 + (i * 7) % 5) for i in range(n)]  # varied lengths; first token = index


def test_batches_go_longest_first_and_outputs_keep_prompt_order() -> None:
    generator = FakeGenerator()
    outputs, size = generate_all(_prompts(10), generator, 4, 8)
    assert outputs == [f"out {i}" for i in range(10)] and size == 4
    assert generator.attempts == [4, 4, 2]
    lengths = [len(_prompts(10)[i]) for batch in generator.generated for i in batch]
    assert lengths == sorted(lengths, reverse=True)


def test_out_of_memory_halves_the_concurrency_and_keeps_what_was_finished() -> None:
    generator = FakeGenerator(limit=3)
    outputs, size = generate_all(_prompts(10), generator, 16, 8)
    assert outputs == [f"out {i}" for i in range(10)]
    assert generator.attempts == [10, 8, 4, 2, 2, 2, 2, 2] and size == 2  # 10 prompts: the first batch holds 10
    assert sorted(i for batch in generator.generated for i in batch) == list(range(10))


def test_out_of_memory_at_batch_size_one_is_a_clear_error() -> None:
    with pytest.raises(TracesftError, match="single example.*max_new_tokens"):
        generate_all(_prompts(3), FakeGenerator(limit=0), 4, 8)


def test_interrupted_generation_resumes_with_only_the_missing_examples(tmp_path: Path) -> None:
    prompts = _prompts(10)
    keys = [cache_key("model", None, f"prompt {i}", {"max_new_tokens": 8}) for i in range(10)]
    cache = GenerationCache(tmp_path / "cache")
    first = FakeGenerator(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        generate_all(prompts, first, 3, 8, keys=keys, cache=cache)
    done = {i for batch in first.generated for i in batch}
    assert len(done) == 6

    second = FakeGenerator()
    outputs, _ = generate_all(prompts, second, 3, 8, keys=keys, cache=cache)
    assert sorted(i for batch in second.generated for i in batch) == sorted(set(range(10)) - done)
    assert outputs == [f"out {i}" for i in range(10)]

    third = FakeGenerator()
    assert generate_all(prompts, third, 3, 8, keys=keys, cache=cache)[0] == outputs
    assert third.attempts == []


def test_cache_key_changes_with_what_changes_outputs() -> None:
    greedy = generation_signature(EvalSettings(), "nf4-merged-bf16")
    assert generation_signature(EvalSettings(batch_size=3, pad_to_multiple_of=8), "nf4-merged-bf16") == greedy
    keys = {
        cache_key("m", None, "p", greedy),
        cache_key("m2", None, "p", greedy),
        cache_key("m", "adapter-hash", "p", greedy),
        cache_key("m", None, "p2", greedy),
        cache_key("m", None, "p", generation_signature(EvalSettings(max_new_tokens=7), "nf4-merged-bf16")),
        cache_key("m", None, "p", generation_signature(EvalSettings(do_sample=True), "nf4-merged-bf16")),
        cache_key("m", None, "p", generation_signature(EvalSettings(), "nf4-unmerged-bf16")),
    }
    assert len(keys) == 7


def test_a_torn_cache_file_is_generated_again(tmp_path: Path) -> None:
    cache = GenerationCache(tmp_path)
    cache.put("ab" * 32, "text")
    assert cache.get("ab" * 32) == "text"
    (tmp_path / "ab" / f"{'ab' * 32}.json").write_text('{"outp')
    assert cache.get("ab" * 32) is None and cache.get("cd" * 32) is None
