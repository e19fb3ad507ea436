"""Reading a Corr2Cause problem: its variables, its statistical statements and its hypothesis.

The official split words every problem the same way (`Premise: Suppose there is a closed system
of N variables, A, B and C. All the statistical relations among these N variables are as follows:
A correlates with B. ... However, A and C are independent given B.` then `Hypothesis: A directly
causes C.`), but teacher harnesses and our own paraphrases reword it, so each statement and each
hypothesis template is recognised in its official wording and in the common paraphrases listed in
`_STATEMENT_PATTERNS` and `_HYPOTHESIS_PATTERNS`. A sentence that matches none of them raises
`MalformedProblemError` naming the sentence: guessing would let an unverified label through.

Names are kept as written; nothing here depends on which letters are used or in what order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tracesft.errors import TracesftError

PARENT = "parent"  # x directly causes y
CHILD = "child"  # y directly causes x
NON_PARENT_ANCESTOR = "non-parent ancestor"  # x causes y through something else
NON_CHILD_DESCENDANT = "non-child descendant"  # y causes x through something else
HAS_COLLIDER = "has_collider"  # x and y have a common effect
HAS_CONFOUNDER = "has_confounder"  # x and y have a common cause
TEMPLATES = (PARENT, CHILD, NON_PARENT_ANCESTOR, NON_CHILD_DESCENDANT, HAS_COLLIDER, HAS_CONFOUNDER)


class MalformedProblemError(TracesftError):
    """The problem text is not a Corr2Cause problem we can read, or its statements contradict."""


@dataclass(frozen=True)
class Independence:
    """`x` and `y` are independent given `given` (empty: marginally independent)."""

    pair: frozenset[str]
    given: frozenset[str]


@dataclass(frozen=True)
class Premise:
    """Everything the premise says; `independences` are ALL the (conditional) independences."""

    variables: frozenset[str]
    correlations: frozenset[frozenset[str]]
    independences: frozenset[Independence]


@dataclass(frozen=True)
class Hypothesis:
    template: str  # one of TEMPLATES
    x: str
    y: str

    def __str__(self) -> str:
        return f"{self.template}({self.x}, {self.y})"


@dataclass(frozen=True)
class Problem:
    premise: Premise
    hypothesis: Hypothesis


_NAME = r"[A-Za-z][A-Za-z0-9_]*"
_LIST = rf"{_NAME}(?:\s*,\s*{_NAME})*(?:,?\s+and\s+{_NAME})?"
_GIVEN = r"(?:given|conditional on|conditioned on|controlling for|when controlling for)"

# (kind, pattern); kind is "corr", "indep" or "cond". Sentences are matched whole.
_STATEMENT_PATTERNS = [
    (kind, re.compile(pattern, re.IGNORECASE))
    for kind, pattern in [
        ("corr", rf"(?P<x>{_NAME}) (?:correlates|is correlated|is associated) with (?P<y>{_NAME})"),
        ("corr", rf"(?P<x>{_NAME}) and (?P<y>{_NAME}) are (?:correlated|dependent|associated)"),
        ("corr", rf"(?P<x>{_NAME}) (?:is dependent on|depends on) (?P<y>{_NAME})"),
        ("cond", rf"(?P<x>{_NAME}) and (?P<y>{_NAME}) are (?:conditionally )?independent {_GIVEN} (?P<z>{_LIST})"),
        ("cond", rf"(?P<x>{_NAME}) is (?:conditionally )?independent of (?P<y>{_NAME}) {_GIVEN} (?P<z>{_LIST})"),
        ("indep", rf"(?P<x>{_NAME}) is (?:marginally |unconditionally )?independent (?:of|from) (?P<y>{_NAME})"),
        ("indep", rf"(?P<x>{_NAME}) and (?P<y>{_NAME}) are (?:marginally |unconditionally )?independent"),
    ]
]

# (template, swapped, pattern): swapped means the sentence names the pair in the other order.
_HYPOTHESIS_PATTERNS = [
    (template, swapped, re.compile(pattern, re.IGNORECASE))
    for template, swapped, pattern in [
        (PARENT, False, rf"(?P<x>{_NAME}) directly (?:causes|affects|influences) (?P<y>{_NAME})"),
        (PARENT, False, rf"(?P<x>{_NAME}) is a direct cause (?:of|for) (?P<y>{_NAME})"),
        (PARENT, False, rf"(?P<x>{_NAME}) is a parent of (?P<y>{_NAME})"),
        (CHILD, False, rf"(?P<x>{_NAME}) is directly (?:caused|affected|influenced) by (?P<y>{_NAME})"),
        (CHILD, False, rf"(?P<x>{_NAME}) is a (?:direct effect|child) of (?P<y>{_NAME})"),
        (NON_PARENT_ANCESTOR, False, rf"(?P<x>{_NAME}) causes something else which causes (?P<y>{_NAME})"),
        (NON_PARENT_ANCESTOR, False, rf"(?P<x>{_NAME}) (?:influences|affects|causes) (?P<y>{_NAME}) through some mediators?(?:\(s\))?"),
        (NON_PARENT_ANCESTOR, False, rf"(?P<x>{_NAME}) is an indirect cause of (?P<y>{_NAME})"),
        (NON_CHILD_DESCENDANT, True, rf"(?P<x>{_NAME}) is a cause (?:for|of) (?P<y>{_NAME}), but not a direct one"),
        (NON_CHILD_DESCENDANT, False, rf"(?P<x>{_NAME}) is (?:indirectly caused|caused indirectly) by (?P<y>{_NAME})"),
        (HAS_COLLIDER, False, rf"there exists at least one collider (?:\((?:i\.e\., )?common effect\) )?of (?P<x>{_NAME}) and (?P<y>{_NAME})"),
        (HAS_COLLIDER, False, rf"there exists at least one common effect of (?P<x>{_NAME}) and (?P<y>{_NAME})"),
        (HAS_COLLIDER, False, rf"(?P<x>{_NAME}) and (?P<y>{_NAME}) (?:together cause some other variables?(?:\(s\))?|have a common effect)"),
        (HAS_CONFOUNDER, False, rf"there exists at least one confounder (?:\((?:i\.e\., )?common cause\) )?of (?P<x>{_NAME}) and (?P<y>{_NAME})"),
        (HAS_CONFOUNDER, False, rf"there exists at least one common cause of (?P<x>{_NAME}) and (?P<y>{_NAME})"),
        (HAS_CONFOUNDER, False, rf"some variables?(?:\(s\))? causes?(?:\(s\))? both (?P<x>{_NAME}) and (?P<y>{_NAME})"),
        (HAS_CONFOUNDER, False, rf"(?P<x>{_NAME}) and (?P<y>{_NAME}) have a common cause"),
    ]
]

_HEADER = re.compile(
    rf"Suppose there is a closed system of (?P<n>\d+) variables,\s*(?P<names>{_LIST})\s*\.\s*"
    rf"All the statistical relations among these \d+ variables are as follows:\s*",
    re.IGNORECASE,
)


def parse_problem(text: str) -> Problem:
    """Split `Premise: ... Hypothesis: ...` and read both halves."""
    premise_text, marker, hypothesis_text = text.partition("Hypothesis:")
    if not marker:
        raise MalformedProblemError("the problem has no 'Hypothesis:' part.")
    premise_text = re.sub(r"^\s*Premise:\s*", "", premise_text)
    premise = parse_premise(premise_text)
    hypothesis = parse_hypothesis(hypothesis_text)
    unknown = {hypothesis.x, hypothesis.y} - premise.variables
    if unknown or hypothesis.x == hypothesis.y:
        raise MalformedProblemError(
            f"the hypothesis is about {hypothesis.x} and {hypothesis.y}, but the premise's variables are "
            f"{', '.join(sorted(premise.variables))}."
        )
    return Problem(premise=premise, hypothesis=hypothesis)


def parse_premise(text: str) -> Premise:
    header = _HEADER.search(text)
    if header is None:
        raise MalformedProblemError(
            "the premise does not open with 'Suppose there is a closed system of N variables, ... "
            "All the statistical relations among these N variables are as follows:'."
        )
    names = _split_list(header.group("names"))
    if len(names) != int(header.group("n")) or len(set(names)) != len(names):
        raise MalformedProblemError(f"the premise announces {header.group('n')} variables but lists {', '.join(names)}.")
    variables = frozenset(names)
    correlations: set[frozenset[str]] = set()
    independences: set[Independence] = set()
    for sentence in _sentences(text[header.end() :]):
        kind, match = _match_statement(sentence)
        pair = frozenset((match.group("x"), match.group("y")))
        given = frozenset(_split_list(match.group("z"))) if kind == "cond" else frozenset()
        mentioned = pair | given
        if len(pair) != 2 or not mentioned <= variables or given & pair:
            raise MalformedProblemError(f"statement {sentence!r} names variables outside {', '.join(names)} or repeats one.")
        if kind == "corr":
            correlations.add(pair)
        else:
            independences.add(Independence(pair=pair, given=given))
    contradictions = correlations & {i.pair for i in independences if not i.given}
    if contradictions:
        pair = " and ".join(sorted(next(iter(contradictions))))
        raise MalformedProblemError(f"the premise says {pair} are both correlated and independent.")
    return Premise(variables=variables, correlations=frozenset(correlations), independences=frozenset(independences))


def parse_hypothesis(text: str) -> Hypothesis:
    sentence = " ".join(text.split()).rstrip(". ")
    for template, swapped, pattern in _HYPOTHESIS_PATTERNS:
        match = pattern.fullmatch(sentence)
        if match:
            x, y = match.group("x"), match.group("y")
            return Hypothesis(template=template, x=y, y=x) if swapped else Hypothesis(template=template, x=x, y=y)
    raise MalformedProblemError(f"hypothesis {sentence!r} matches none of the six Corr2Cause relation templates.")


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\bHowever,\s*", "", " ".join(text.split()))
    return [s.strip().rstrip(".") for s in re.split(r"(?<=\.)\s+", text) if s.strip().rstrip(".")]


def _match_statement(sentence: str) -> tuple[str, re.Match[str]]:
    for kind, pattern in _STATEMENT_PATTERNS:
        match = pattern.fullmatch(sentence)
        if match:
            return kind, match
    raise MalformedProblemError(
        f"premise statement {sentence!r} is neither a correlation nor an (conditional) independence."
    )


def _split_list(text: str) -> list[str]:
    return [name for name in re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+", text.strip()) if name]
