"""The continuous-batching engine decodes exactly what HF `generate` decodes, one prompt at a time.

On the tiny Qwen2 (CPU, fp32) with a random LoRA adapter kept unmerged, as evaluation runs it:
mixed prompt and answer lengths, fewer slots than prompts (so finished slots are refilled), any
arrival order, and an interruption part-way followed by a resume from the generation cache.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

from tracesft.config import EvalSettings
from tracesft.data.sample_data import tokenizer_corpus
from tracesft.generate.batching import GenerationCache, engine_decoder, fits_every_row, generate_all, stop_tokens
from tracesft.generate.engine import SIDE_STREAM_BELOW_ROWS, Engine, Sampling, supports
from tracesft.generate.inference import prepare_for_inference
from tracesft.train.modeling import load_tokenizer
from tracesft.train.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, object]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    directory = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_corpus())
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # a trained adapter is not zero
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return prepare_for_inference(model).eval(), load_tokenizer(str(directory))


def _requests(vocab: int, count: int = 9, seed: int = 1) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(2, 40))] for _ in range(count)]
    limits = [rng.randint(1, 24) for _ in range(count)]
    return prompts, limits


def _reference(model: nn.Module, prompt: list[int], limit: int, stop: list[int]) -> list[int]:
    """HF `generate`, greedy, this prompt alone."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=limit, do_sample=False, temperature=None, top_p=None, top_k=None,
            eos_token_id=stop, pad_token_id=stop[0],
        )
    return out[0, len(prompt) :].tolist()


def _run(engine: Engine, prompts: list[list[int]], limits: list[int], order: list[int], stop: list[int]) -> dict[int, list[int]]:
    results: dict[int, list[int]] = {}
    engine.run([prompts[i] for i in order], [limits[i] for i in order],
               lambda position, tokens: results.__setitem__(order[position], tokens), stop_tokens=stop)
    return results


def test_the_tiny_model_is_supported(tiny) -> None:
    assert supports(tiny[0])


def test_greedy_outputs_equal_hf_generate_one_prompt_at_a_time_in_any_order_with_refills(tiny) -> None:
    model, tokenizer = tiny
    stop = stop_tokens(model, tokenizer)
    prompts, limits = _requests(model.config.vocab_size)
    expected = {i: _reference(model, p, n, stop) for i, (p, n) in enumerate(zip(prompts, limits))}
    max_len = max(len(p) + n for p, n in zip(prompts, limits))
    for slots, order in [(3, list(range(len(prompts)))), (4, random.Random(5).sample(range(len(prompts)), len(prompts))),
                         (len(prompts), list(range(len(prompts)))[::-1])]:
        got = _run(Engine(model, slots, max_len), prompts, limits, order, stop)
        assert got == expected, f"slots={slots}, order={order}"


def test_a_cache_too_small_for_all_rows_preempts_and_still_decodes_exactly(tiny) -> None:
    """Fewer KV blocks than the rows could fill: runs grow in place, move and are compacted, and
    when nothing is left the latest admitted request is preempted and recomputed from its prompt
    and answer so far: the greedy tokens are still HF `generate`'s."""
    model, tokenizer = tiny
    stop = stop_tokens(model, tokenizer)
    prompts, limits = _requests(model.config.vocab_size, count=12, seed=8)
    expected = {i: _reference(model, p, n, stop) for i, (p, n) in enumerate(zip(prompts, limits))}
    max_len = max(len(p) + n for p, n in zip(prompts, limits))
    engine = Engine(model, 6, max_len, blocks=33, block_size=4)  # 128 positions for 6 requests of up to 64
    got = _run(engine, prompts, limits, list(range(len(prompts))), stop)
    assert got == expected
    print(engine.stats)
    assert engine.stats.preemptions and engine.stats.moves and engine.stats.compactions
    # Tokens recomputed after a preemption are not counted again: only what the answers hold.
    assert engine.stats.generated_tokens == sum(map(len, got.values()))
    assert engine.cache.free_blocks == 32  # every run returned


def test_the_lora_side_stream_serves_small_steps_only_unless_nf4_layers_hide_it(tiny) -> None:
    """Dense weights: the LoRA products go beside the base products only below
    SIDE_STREAM_BELOW_ROWS rows (above, they slow the base products down); kept NF4 layers hide
    them at every row count (measured on the 32B, see the constant)."""
    import copy
    import math

    import bitsandbytes as bnb

    model, _ = tiny
    assert Engine(model, 4, 64).side_stream_below_rows == SIDE_STREAM_BELOW_ROWS
    nf4 = copy.deepcopy(model)
    mlp = nf4.model.layers[0].mlp
    mlp.down_proj.base = bnb.nn.Linear4bit(mlp.down_proj.base.in_features, mlp.down_proj.base.out_features, bias=False)
    assert Engine(nf4, 4, 64).side_stream_below_rows == math.inf


def test_a_pool_with_room_for_every_row_is_planned_at_that_size_not_at_the_free_memory() -> None:
    # 32 rows of 330 positions in blocks of 64: 6 blocks a row, and the engine's scratch block.
    assert fits_every_row(blocks=193, rows=32, longest=330, block_size=64)
    assert not fits_every_row(blocks=192, rows=32, longest=330, block_size=64)
    assert fits_every_row(blocks=450_000, rows=32, longest=330, block_size=64)  # the H200's free memory in blocks


def test_a_prompt_longer_than_the_whole_cache_is_refused(tiny) -> None:
    model, _ = tiny
    with pytest.raises(torch.cuda.OutOfMemoryError, match="KV blocks"):
        Engine(model, 2, 80, blocks=2).run([[5] * 40], 8, lambda *_: None)


def test_an_answer_ends_at_its_limit_or_its_stop_token(tiny) -> None:
    model, tokenizer = tiny
    prompts, limits = _requests(model.config.vocab_size, count=4, seed=3)
    free_running = _run(Engine(model, 2, 80), prompts, [30] * 4, list(range(4)), stop=[])
    assert all(len(tokens) == 30 for tokens in free_running.values())
    stop = [free_running[0][5]]  # a token the first answer emits: it must end right there
    stopped = _run(Engine(model, 2, 80), prompts, [30] * 4, list(range(4)), stop=stop)
    assert stopped[0] == free_running[0][: free_running[0].index(stop[0]) + 1]


def test_sampling_is_seeded_and_respects_limits(tiny) -> None:
    model, _ = tiny
    prompts, limits = _requests(model.config.vocab_size, count=5, seed=4)

    def sample() -> dict[int, list[int]]:
        results: dict[int, list[int]] = {}
        Engine(model, 2, 80).run(prompts, limits, results.__setitem__,
                                 sampling=Sampling(temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(7)))
        return results

    first = sample()
    assert first == sample()
    assert all(len(first[i]) == limits[i] for i in range(len(prompts)))


def test_an_interrupted_evaluation_resumes_from_the_cache_with_the_same_outputs(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    settings = EvalSettings(max_new_tokens=16)
    prompts, _ = _requests(model.config.vocab_size, count=8, seed=6)
    keys = [f"{i:064d}" for i in range(len(prompts))]
    decode = engine_decoder(model, tokenizer, settings)
    expected, _ = generate_all(prompts, decode, 3, 16)

    calls = []

    def interrupted(prompts_, limits_, concurrency, finished) -> None:
        def count(position: int, text: str) -> None:
            if len(calls) == 5:
                raise KeyboardInterrupt
            calls.append(position)
            finished(position, text)

        decode(prompts_, limits_, concurrency, count)

    cache = GenerationCache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        generate_all(prompts, interrupted, 3, 16, keys=keys, cache=cache)
    assert sum(cache.get(key) is not None for key in keys) == 5

    resumed: list[int] = []

    def counting(prompts_, limits_, concurrency, finished) -> None:
        resumed.append(len(prompts_))
        decode(prompts_, limits_, concurrency, finished)

    outputs, _ = generate_all(prompts, counting, 3, 16, keys=keys, cache=cache)
    assert resumed == [3] and outputs == expected


def test_stats_account_for_every_step_row_and_second(tiny) -> None:
    """The figures a benchmark reads to say what binds: steps by captured row count, busy rows,
    the tail after the queue emptied, and the run's time split into prefill, decode and the rest."""
    model, tokenizer = tiny
    prompts, limits = _requests(model.config.vocab_size, count=12, seed=3)
    engine = Engine(model, 4, max(len(p) + n for p, n in zip(prompts, limits)))
    _run(engine, prompts, limits, list(range(len(prompts))), stop=[])  # no stop token: every answer runs to its limit
    stats, summary = engine.stats, engine.stats.summary()
    assert sum(stats.steps_by_rows.values()) == stats.steps and set(stats.steps_by_rows) <= set(engine.buckets)
    assert stats.busy_rows == sum(limits) - len(prompts)  # each answer's first token comes from its prefill
    assert stats.prefill_tokens == sum(map(len, prompts)) and stats.prefill_calls >= 3  # 12 requests through 4 rows
    assert 0 < stats.tail_steps < stats.steps and 0 < stats.tail_s < stats.decode_s
    assert 0 < stats.prefill_s + stats.decode_s <= stats.run_s and summary["scheduling_s"] >= 0
    assert summary["mean_busy_rows"] == round(stats.busy_rows / stats.steps, 1) <= 4
    assert summary["generated_tokens"] == sum(limits) and summary["tokens_per_s"] == round(sum(limits) / stats.run_s, 1)
