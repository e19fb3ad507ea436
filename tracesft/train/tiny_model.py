"""A tiny, locally built stand-in for DeepSeek-R1-Distill-Qwen-32B.

The real student model is 32B parameters and lives on the Hugging Face hub, which the
demo and the tests cannot reach. ``build_tiny_model`` writes a directory that loads
through exactly the same ``AutoTokenizer`` / ``AutoModelForCausalLM`` code paths as the
real checkpoint: a Qwen2 model (the architecture family the R1 distill uses) with a
byte-level BPE tokenizer carrying the R1 special tokens and a chat template in the R1
format. Its weights are random, so its outputs are meaningless, but the whole pipeline
(chat formatting, tokenisation, LoRA fine-tuning, generation, saving) runs on a CPU in
seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# The R1-distill chat format, except that assistant turns are written verbatim: the real
# template cuts everything up to ``</think>`` out of earlier assistant turns, which would
# delete the very reasoning traces we fine-tune on. The generation prompt opens a think
# block, as the current R1 template does, so the model always starts by reasoning.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '" + USER_TOKEN + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '" + ASSISTANT_TOKEN + "' + message['content'] + '" + EOS_TOKEN + "' }}"
    "{% else %}"
    "{{ raise_exception('Unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '" + ASSISTANT_TOKEN + THINK_OPEN + "\\n' }}"
    "{% endif %}"
)

# Qwen2's pre-tokenisation split (contractions, letter runs, single digits, punctuation
# runs, newlines, whitespace), so the tiny tokenizer segments text the way the real one does.
_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it for ``transformers``.

    Byte-level BPE with the full 256-byte initial alphabet can encode any string, and its
    byte-level decoder restores it exactly, whatever the corpus covered. The pipeline is
    Qwen2's: NFC normalisation, then Qwen2's split. NFC matters because ``AutoTokenizer``
    loads any ``qwen2`` checkpoint (this one and the real R1 distill alike) as
    ``Qwen2Tokenizer``, which imposes NFC; setting it here too makes the tokenizer behave the
    same however it is loaded. So ``decode(encode(text)) == text`` for NFC text, exactly as
    with the real model. No post-processor adds a BOS: the chat template writes the BOS text
    itself, and adding another would double it.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Non-special, as in the R1 tokenizer: the think block must survive
    # ``decode(..., skip_special_tokens=True)``, since it is what we train on and score.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    # ``unk_token=None`` is saved as an explicit null: without it, ``Qwen2Tokenizer`` (what
    # ``AutoTokenizer`` loads for a ``qwen2`` model) adds its default ``<|endoftext|>`` unk
    # token, one id past the model's embedding table. Byte-level BPE never needs an unk.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=None,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(out_dir: Path, corpus: Iterable[str], *, vocab_size: int = 1024, seed: int = 0) -> Path:
    """Write a tiny random-weight Qwen2 model and its tokenizer to ``out_dir``; return it.

    The result stands in for DeepSeek-R1-Distill-Qwen-32B wherever no hub is reachable:
    it is the same architecture family with the same special tokens and chat format, so
    the real loading, formatting and training code is exercised, only at a size that runs
    on a CPU. The build is deterministic: the same ``corpus`` and ``seed`` give
    byte-identical ``model.safetensors`` and ``tokenizer.json``, so cached artifacts and
    test results are reproducible.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(corpus, vocab_size)
    tokenizer.save_pretrained(out_dir)

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # Seed a forked RNG so building the model leaves the caller's global torch RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
