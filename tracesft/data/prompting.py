"""The one place prompts and training targets are written.

Training and evaluation must show the model exactly the same prompt, so both call
`build_prompt`, which renders the base model's own chat template. The target is the teacher's
reasoning inside `<think>…</think>` followed by a canonical `Answer: Yes|No` line, the format an
R1-distilled model already produces; the answer line is what `extract_answer` reads back.
"""

from __future__ import annotations

from typing import Protocol

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
INSTRUCTION = (
    "Decide whether the hypothesis necessarily follows from the premise. Reason step by step, then "
    "give the final answer on its own line as 'Answer: Yes' or 'Answer: No'."
)


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs) -> str: ...


def build_prompt(tokenizer: ChatTokenizer, query: str) -> str:
    """The rendered prompt, ending where the model's answer begins.

    No system message: DeepSeek recommends putting every instruction in the user turn for R1 models.
    """
    return tokenizer.apply_chat_template(prompt_messages(query), tokenize=False, add_generation_prompt=True)


def prompt_messages(query: str) -> list[dict[str, str]]:
    """The conversation `build_prompt` renders, for trainers that apply the chat template themselves
    (TRL's `GRPOTrainer` renders exactly this, with the generation prompt, and adds no BOS of its own)."""
    return [{"role": "user", "content": f"{query.strip()}\n\n{INSTRUCTION}"}]


def build_completion(prompt: str, trace: str, gold: int) -> str:
    """The training target for one verified trace.

    Recent R1 templates already open `<think>` in the generation prompt; the target then starts
    inside the think block, so the tag is never doubled. The answer line uses the gold label,
    which verification has proven equal to the trace's own answer.
    """
    reasoning = trace.strip()
    if THINK_CLOSE in reasoning:  # an R1-style trace: keep its reasoning, drop its own tags
        reasoning = reasoning.split(THINK_CLOSE)[0].replace(THINK_OPEN, "").strip()
    opened = prompt.rstrip().endswith(THINK_OPEN)
    prefix = "" if opened else THINK_OPEN + "\n"
    answer = "Yes" if gold == 1 else "No"
    return f"{prefix}{reasoning}\n{THINK_CLOSE}\n\nAnswer: {answer}"


def prompt_template() -> dict[str, str]:
    """How `build_prompt` frames a query, stored beside a registered adapter.

    The chat template itself travels in the adapter's tokenizer files; this records the rest, so
    whoever serves the adapter asks it questions exactly as it was trained and evaluated.
    """
    return {"user_message": "{query}\n\n{instruction}", "instruction": INSTRUCTION, "add_generation_prompt": "true"}
