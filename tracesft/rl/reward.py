"""The GRPO reward: is the answer right (the exact solver says), and is it in the asked-for form.

Every part is a TRL reward function (`completions` and the dataset's columns in, one float per
completion out); `GRPOTrainer` weighs them with `reward_weights` and logs each part's mean and
spread (`rewards/<name>/mean`, `/std`) beside the total (`reward`), so a run shows which part moved.

- `correctness`: 1 when the answer `extract_answer` reads (the same reader evaluation scores with)
  is the label the solver derives from the problem text itself, 0 otherwise. No readable answer
  is no reward, so hedging never pays. The label is never the generator's: the solver decides.
- `closed_think`: 1 when the reasoning block is closed by exactly one `</think>`. The R1 prompt
  opens `<think>`; an answer that never closes it has no final answer outside its reasoning.
- `one_answer`: 1 when exactly one `Answer: Yes|No` line follows that `</think>`, the form the
  prompt's instruction asks for; two answer lines (a change of mind left in) earn nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tracesft.config import RewardSettings
from tracesft.data.answers import answer_to_label, extract_answer
from tracesft.data.prompting import THINK_CLOSE, THINK_OPEN
from tracesft.data.solver import solve_text

_ANSWER_LINE = re.compile(r"^[ \t]*Answer:[ \t]*(?:Yes|No)[ \t]*\.?[ \t]*$", re.IGNORECASE | re.MULTILINE)

RewardFunction = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """The text of one completion: TRL hands conversational prompts' completions as message lists."""
    if isinstance(completion, list):
        return "".join(message["content"] for message in completion)
    return completion


def correctness(completions: list[Any], query: list[str], **_: Any) -> list[float]:
    rewards = []
    for completion, problem in zip(completions, query, strict=True):
        answered = answer_to_label(extract_answer(completion_text(completion)))
        rewards.append(float(answered is not None and answered == solve_text(problem).label))
    return rewards


def closed_think(completions: list[Any], **_: Any) -> list[float]:
    return [float(_is_closed(completion_text(c))) for c in completions]


def one_answer(completions: list[Any], **_: Any) -> list[float]:
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        after = text.split(THINK_CLOSE, 1)[1] if _is_closed(text) else ""
        rewards.append(float(len(_ANSWER_LINE.findall(after)) == 1))
    return rewards


def _is_closed(text: str) -> bool:
    """One `</think>`, and no `<think>` after it (the prompt opens the block; a completion may too)."""
    return text.count(THINK_CLOSE) == 1 and THINK_OPEN not in text.split(THINK_CLOSE, 1)[1] and text.count(THINK_OPEN) <= 1


# The parts in the order `reward_weights` lists their weights; each is named by its settings field.
REWARD_PARTS: tuple[RewardFunction, ...] = (correctness, closed_think, one_answer)


def reward_weights(settings: RewardSettings) -> list[float]:
    return [getattr(settings, part.__name__) for part in REWARD_PARTS]

