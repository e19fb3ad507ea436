"""Read the final yes/no decision out of a raw model output.

Verification keeps a teacher trace only when the answer written in its own text matches gold, and
evaluation scores the student the same way, so one reader must serve GPT responses and R1-style
`<think>…</think>` outputs alike. It errs towards "none": a trace whose decision cannot be read
is rejected as unparseable rather than counted with a guessed label.

The rule, applied in order:

1. Region. Text after the last `</think>` is the model's committed answer, so it is read first;
   only if it holds no decision is the think block read instead. A `<think>` that never closes
   means the generation was cut off mid-reasoning, so whatever it says is provisional: "none".
   Output without tags is read whole.
2. Matches. Two tiers of decisive statements are found in the region:
   - explicit markers, which exist only to state the answer: `Answer: No` (also `Final answer`,
     `the answer is/would be`, markdown around either part, JSON keys `"answer": true`) and
     `\\boxed{Yes}` / `\\boxed{\\text{No}}`;
   - loose phrases, which state it in prose: "the hypothesis is (not) necessarily true/valid",
     "... does not necessarily hold/follow", "cannot be inferred/concluded", "... follows
     necessarily", a line holding nothing but Yes/No, or a region that opens with "No," / "Yes.".
3. Choice. The last explicit marker wins; loose phrases decide only when there is no explicit
   marker, and then the last of them wins. Taking the last match lets a model that corrects
   itself ("Answer: Yes ... wait, Answer: No") be read by its final word. Ranking markers above
   prose keeps the justification that often follows an answer line ("Answer: No. One might think
   the hypothesis is valid, but ...") from overturning it.

Bare "yes"/"no" inside a sentence ("there is no edge between A and B") is never a decision, and a
marker whose word runs on into ordinary text ("the answer is yes or no", "the answer is no longer
clear", an echoed "'Answer: Yes' or 'Answer: No'") is not one either. Phrases introduced by
"whether", "if", "assume" and the like are questions or suppositions, not conclusions, and are
skipped. Every quantifier that can meet a long run of the same characters is bounded, so the
scan stays linear on long traces.
"""

from __future__ import annotations

import re
from typing import Literal

Answer = Literal["yes", "no", "none"]

_WORD_TO_ANSWER: dict[str, Answer] = {
    "yes": "yes",
    "true": "yes",
    "valid": "yes",
    "no": "no",
    "false": "no",
    "invalid": "no",
}
_ANSWER_TO_LABEL: dict[str, int | None] = {"yes": 1, "no": 0, "none": None}

_FLAGS = re.IGNORECASE
_THINK_OPEN = re.compile(r"<think>", _FLAGS)
_THINK_CLOSE = re.compile(r"</think>", _FLAGS)

# Markdown underscores are word characters to `\b`, so "__No__" needs letter-based boundaries.
_WORD = r"(?P<word>yes|no|true|false|valid|invalid)(?![a-z0-9])"
# The answer word must end its clause: another word straight after it ("no longer", "yes or no")
# means it was part of a sentence, except for connectives that introduce a justification.
_CLAUSE_END = (
    r"(?![ \t]*[*_`'\")\]]{0,4}"
    r"(?:[ \t]*/|[ \t]+(?!(?:because|since|as)\b)[a-z]))"
)
# A value of None means the answer is the matched word itself. A marker offered as an alternative
# ("... or 'Answer: No'") is an echoed instruction, captured as an aside to be skipped.
_EXPLICIT: list[tuple[re.Pattern[str], Answer | None]] = [
    (
        re.compile(
            r"(?:\b(?P<aside>or)[ \t]+[\"'*_`]{0,4})?"
            r"(?<![a-z0-9])(?:final[ \t_]+)?answer(?![a-z0-9])[\"'*_`]{0,4}[ \t]{0,4}"
            r"(?::|=|(?:is|would[ \t]+be|should[ \t]+be|must[ \t]+be)\b[ \t]{0,4}:?)"
            r"[ \t\n*_`\"'\[(]{0,8}" + _WORD + _CLAUSE_END,
            _FLAGS,
        ),
        None,
    ),
    (
        re.compile(
            r"\\boxed[ \t]{0,4}\{[ \t]{0,4}"
            r"(?:\\(?:text|textbf|mathrm|mathbf|mbox)[ \t]{0,4}\{[ \t]{0,4})?"
            r"[*\"'`]{0,2}" + _WORD + r"[^{}\n]{0,40}\}",
            _FLAGS,
        ),
        None,
    ),
]

# A supposition or question about the hypothesis is captured as an aside so that it can be
# skipped rather than matched a few characters later without its introducing word.
_HEDGE = (
    r"(?:\b(?P<aside>whether(?:[ \t]+or[ \t]+not)?|if|unless|assume|assuming|suppose|supposing)"
    r"\s+)?"
)
_SUBJECT = (
    r"\b(?:the|this)\s+(?:causal\s+|given\s+|proposed\s+)?(?:hypothesis|claim|statement)"
    r"(?:\s+that\s[^.\n]{0,150}?|\s*\([^()\n]{0,150}\)|\s*\"[^\"\n]{0,150}\")?"
)
_NOT_A_CHOICE = r"(?!\s*(?:/|or\b))"


def _loose(body: str, value: Answer) -> tuple[re.Pattern[str], Answer]:
    return re.compile(_HEDGE + body, _FLAGS), value


_LOOSE: list[tuple[re.Pattern[str], Answer | None]] = [
    _loose(
        _SUBJECT + r"\s+(?:is\s+not|isn't|cannot\s+be|can't\s+be|can\s*not\s+be|may\s+not\s+be"
        r"|might\s+not\s+be|need\s+not\s+be)\s+(?:necessarily\s+|always\s+)?"
        r"(?:true|valid|correct|implied|entailed|supported|guaranteed)\b",
        "no",
    ),
    _loose(
        _SUBJECT + r"\s+is\s+(?:necessarily\s+|therefore\s+|thus\s+)?"
        r"(?:false|invalid|incorrect|unsupported)\b" + _NOT_A_CHOICE,
        "no",
    ),
    _loose(
        _SUBJECT + r"\s+(?:does\s+not|doesn't|need\s+not|cannot|can't|can\s*not)\s+"
        r"(?:necessarily\s+)?(?:hold|follow)\b",
        "no",
    ),
    _loose(
        r"\b(?:cannot|can't|can\s*not)\s+(?:necessarily\s+)?"
        r"(?:be\s+(?:necessarily\s+)?(?:inferred|concluded|deduced|established)"
        r"|infer|conclude|deduce)\b",
        "no",
    ),
    _loose(
        _SUBJECT + r"\s+(?:is|must\s+be)\s+"
        r"(?:necessarily\s+|therefore\s+|thus\s+|indeed\s+|always\s+)?"
        r"(?:true|valid|correct|implied|entailed|guaranteed)\b" + _NOT_A_CHOICE,
        "yes",
    ),
    _loose(_SUBJECT + r"\s+(?:necessarily\s+)?(?:follows|holds)\b", "yes"),
    (
        re.compile(
            r"^[ \t>#*_`]{0,12}(?P<word>yes|no|true|false)(?![a-z0-9])[ \t*_`]{0,6}[.!]?[ \t*_`]{0,6}$",
            _FLAGS | re.MULTILINE,
        ),
        None,
    ),
    (
        re.compile(r"\A\s*[*_`]{0,4}(?P<word>yes|no)(?![a-z0-9])[*_`]{0,4}[ \t]{0,4}[.,!;:]", _FLAGS),
        None,
    ),
]


def extract_answer(text: str) -> Answer:
    """The decision a grader should score, or "none" when the text commits to none."""
    if not text:
        return "none"
    closes = list(_THINK_CLOSE.finditer(text))
    if not closes:
        return "none" if _THINK_OPEN.search(text) else _decide(text)
    last_close = closes[-1]
    after = _decide(text[last_close.end() :])
    if after != "none":
        return after
    return _decide(_THINK_OPEN.sub("", text[: last_close.start()]))


def _decide(region: str) -> Answer:
    explicit = _last(region, _EXPLICIT)
    if explicit is not None:
        return explicit
    loose = _last(region, _LOOSE)
    return loose if loose is not None else "none"


def _last(region: str, patterns: list[tuple[re.Pattern[str], Answer | None]]) -> Answer | None:
    best_start, best = -1, None
    for pattern, value in patterns:
        for match in pattern.finditer(region):
            if match.groupdict().get("aside") or match.start() <= best_start:
                continue
            best_start = match.start()
            best = value if value is not None else _WORD_TO_ANSWER[match["word"].lower()]
    return best


def answer_to_label(answer: Answer) -> int | None:
    """Corr2Cause's gold encoding, so a read answer can be compared with the dataset directly."""
    try:
        return _ANSWER_TO_LABEL[answer]
    except KeyError:
        raise ValueError(f"not an answer: {answer!r}") from None
