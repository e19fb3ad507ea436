"""The tiny stand-in model loads and behaves like the R1 distill where the pipeline relies on it."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tracesft.train.tiny_model import build_tiny_model

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

CORPUS = [
    "Premise: Suppose there is a closed system of 3 variables, A, B and C. "
    "All the statistical relations among these 3 variables are as follows: "
    "A correlates with B. A correlates with C. B correlates with C. "
    "However, B and C are independent given A.\n"
    "Hypothesis: A directly causes B.",
    "Premise: Suppose there is a closed system of 4 variables, A, B, C and D. "
    "A is independent of D. C correlates with D.\n"
    "Hypothesis: There exists at least one collider (i.e., common effect) of A and B.",
    "<think>\nB and C become independent once we condition on A, so A d-separates them. "
    "The skeleton is B - A - C with no collider at A.\n</think>\n\nAnswer: Yes",
    "<think>\nA and D are unconditionally independent, so no path may be open between them. "
    "Therefore the hypothesis does not follow.\n</think>\n\nAnswer: No",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", CORPUS)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


def test_build_creates_and_returns_out_dir(model_dir: Path) -> None:
    assert model_dir.is_dir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file(), name


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert tokenizer.bos_token == BOS
    assert tokenizer.eos_token == EOS
    assert tokenizer.pad_token == EOS
    assert tokenizer.model_max_length == 4096


def test_chat_template_keeps_think_block(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are a careful causal reasoner."},
        {"role": "user", "content": "Premise: ... Hypothesis: A directly causes B."},
        {"role": "assistant", "content": "<think>reasoning</think>\n\nAnswer: Yes"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        BOS
        + "You are a careful causal reasoner."
        + "<｜User｜>Premise: ... Hypothesis: A directly causes B."
        + "<｜Assistant｜><think>reasoning</think>\n\nAnswer: Yes"
        + EOS
    )


def test_generation_prompt_opens_think_block(tokenizer) -> None:
    messages = [{"role": "user", "content": "Hypothesis: A directly causes B."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(BOS)
    assert text.endswith("<｜Assistant｜><think>\n")


def test_encoding_adds_no_bos(tokenizer) -> None:
    ids = tokenizer("Premise: A correlates with B.")["input_ids"]
    assert tokenizer.bos_token_id not in ids
    # The template writes the BOS text itself; it must encode to exactly one BOS token.
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    chat_ids = tokenizer(chat)["input_ids"]
    assert chat_ids[0] == tokenizer.bos_token_id
    assert chat_ids.count(tokenizer.bos_token_id) == 1


def test_decode_round_trips_unicode(tokenizer) -> None:
    text = "Café — naïve 日本語 🤖: A → B ∧ ¬(C ⫫ D)\n\t<think>x</think>"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_think_tags_survive_skip_special_tokens(tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>\nr\n</think>\n\nAnswer: No"},
        ],
        tokenize=False,
    )
    decoded = tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
    assert decoded == "q<think>\nr\n</think>\n\nAnswer: No"


def test_model_loads_and_generates(model_dir: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "qwen2"
    assert model.dtype == torch.float32
    # Every token the loaded tokenizer can emit must have an embedding row.
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hypothesis: A directly causes B."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5)


def test_build_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    rebuilt = build_tiny_model(tmp_path / "again", CORPUS)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (rebuilt / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_seed_changes_weights(model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "seed1", CORPUS, seed=1)
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()
