"""Read the final yes/no decision out of a raw model output.

Verification keeps a teacher trace only when the answer written in its own text matches gold, and
evaluation scores the student the same way, so one reader must serve GPT responses and R1-style
`<think>…</think>` outputs alike. It errs towards "none": a trace whose decision cannot be read
is rejected as unparseable rather than counted with a guessed label, because a misread answer
that happens to match gold lets a wrong trace into training, which costs more than losing one.

The rule, applied in order:

1. Region. Text after the last `</think>` is the model's committed answer, so it is read first;
   only if it holds no decision is the think block read instead. A `<think>` that never closes
   means the generation was cut off mid-reasoning, so whatever it says is provisional: "none".
   Output without tags is read whole. The region is read as plain characters: full-width forms
   are folded to ASCII (`Answer：Yes。`) and typographic quotes to straight ones (`«Yes»`,
   `„No“`, `‘Yes’`), so a verdict reads the same whatever keyboard or locale wrote it.
2. Matches. The answer word is Yes/No, True/False or Valid/Invalid (the verdict on the
   hypothesis), in any case, with Markdown emphasis, code ticks or quotes around it. Two tiers of
   decisive statements are found in the region:
   - explicit statements, whose form exists only to state the answer:
     - markers: `Answer: No`, `Answer - No` (also `Final answer`, `the answer is/would be`, JSON
       keys `"answer": true`) and `\\boxed{Yes}` / `\\boxed{\\text{No}}`;
     - labels: a phrase of a few words opening a line or sentence that names a conclusion
       (conclusion, verdict, therefore, so, overall, based on, bottom line, after careful
       analysis, on reflection, after re-checking, hypothesis, ...), followed by a colon or
       dash or standing alone as a heading line, and then the word: `Therefore: No`,
       `Conclusion: Yes, ...`, `... Let me think again. After careful analysis: No.`,
       `## Final Answer` over `No.`. A label names; it says nothing itself, so "The
       conclusion is not clear: yes, ..." is no label;
     - a question about the hypothesis, restated and answered at once: `Is the hypothesis
       valid? Yes.`, `Can we conclude that C is a confounder? No.` (a question that names no
       hypothesis, necessity or inference, such as `Is A correlated with C? Yes`, is reasoning);
   - loose phrases, which state it in prose: "the hypothesis is (not) necessarily true/valid",
     "... does not necessarily hold/follow", "cannot be inferred/concluded", "... follows
     necessarily"; a line that opens with the word and sets it off, by standing alone, by
     emphasis or by a dash (`**Yes** — A directly causes C.`, `Invalid`, `**No.** ...`; not by
     a colon: "Yes: B is a collider" answers a step of the reasoning); a region that opens with
     the word (`No, ...`, `Valid.`; but "True, ..." concedes a point); a concluding phrase with
     a comma and the word as its whole sentence (`In conclusion, no.`).
3. Commitment. A word decides only if it ends its clause unqualified: not run on into the
   sentence ("no longer", "yes or no"), not followed by a slash or question mark, and not
   qualified or retracted right after ("Yes, if ...", "No (probably)", "Yes. Wait, ...", or
   "Wait"/"Hmm"/"Actually" opening the next line); "because", "since", "as" and a dash or
   bracket that opens a justification are fine. A prose phrase qualified after it ("holds only
   if ...", "is valid?") does not decide either. A statement introduced, in the same sentence,
   by a supposition, question or mere opinion ("if", "whether", "maybe", "assuming", "one might
   think", "I'm not sure that") or offered as an alternative ("or 'Answer: No'", "otherwise
   'Answer: No'", the prompt's own format echoed) is an aside, and is skipped.
4. Choice. The last explicit statement wins; loose phrases decide only when there is no explicit
   one, and then the last of them wins. Taking the last match lets a model that corrects itself
   ("Answer: Yes ... wait, Answer: No") be read by its final word. Ranking explicit statements
   above prose keeps the justification that often follows an answer line ("Answer: No. One
   might think the hypothesis is valid, but ...") from overturning it.

Bare "yes"/"no" inside a sentence ("there is no edge between A and B", "so yes, they are
dependent") is never a decision. Every quantifier that can meet a long run of the same characters
is bounded, so the scan stays linear on long traces. Precision and recall on a table of realistic
outputs (`tests/data/answer_table.txt`) are measured by `benchmarks/answer_extraction.py` and
recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import re
import unicodedata
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

# NFKC folds full-width letters and punctuation; these have no compatibility form to fold.
_TYPOGRAPHY = str.maketrans(
    {
        **dict.fromkeys("«»„“”‟「」『』", '"'),
        **dict.fromkeys("‘’‚‛‹›", "'"),
        "。": ".",
        "、": ",",
    }
)

# Markdown underscores are word characters to `\b`, so "__No__" needs letter-based boundaries.
_WORD = r"(?P<word>yes|no|true|false|valid|invalid)(?![a-z0-9])"
_DECOR = r"[*_`\"']"  # emphasis, code ticks and quotes around a word
_DASH = r"[-\u2013\u2014]{1,2}"  # hyphen, en dash, em dash; "--" too
_GAP = r"[\s*_`]{1,8}"  # between the words of a phrase: "is **not** valid"
# Words that make what they introduce a supposition or question rather than a claim.
_SUPPOSING = r"(?:whether|if|unless|assum(?:e|ing)|suppos(?:e|ing)|maybe|perhaps|probably|possibly)"
# Words after a statement that make it one of two options or hold only under a condition.
_CONDITIONAL = r"(?:or|otherwise|if|unless|when|whenever|provided|assuming|depending)"
# What may follow the answer word and make it conditional, tentative or taken back.
_QUALIFIER = (
    r"(?:" + _CONDITIONAL + r"|maybe|perhaps|probably|possibly|likely|but|wait|hmm|actually"
    r"|not[ \t]{1,4}(?:sure|certain)|unsure|uncertain|tentative(?:ly)?)\b"
)
# The answer word must end its clause unqualified: another word straight after it ("no longer",
# "yes or no") means it was part of a sentence, except for connectives that introduce a
# justification; a qualifier after punctuation ("Yes, if ...") or a retraction opening the next
# line ("Yes.\n\nWait, ...") takes the commitment back.
_COMMITTED = (
    r"(?![ \t]{0,4}[*_`'\")\]]{0,4}(?:"
    r"[ \t]{0,4}[/?]"
    r"|[ \t]{1,4}(?!(?:because|since|as)\b)[a-z]"
    r"|[ \t]{0,4}[.,;:!(\-\u2013\u2014]{0,3}[ \t]{0,4}" + _QUALIFIER +
    r"|[.!]?\s{0,4}(?:wait|hmm|actually)\b"
    r"))"
)
# A statement is an aside, not a decision, when what comes before it in its clause offers it as an
# alternative ("... or 'Answer: No'", "otherwise 'Answer: No'") or as a supposition, question or
# opinion ("If B is a collider, the answer is yes", "one might think the hypothesis is valid"),
# unless a connective such as "but" or "so" starts a committed clause in between.
_ALTERNATIVE_BEFORE = re.compile(r"\b(?:or|otherwise|either)[ \t]{1,4}" + _DECOR + r"{0,4}\Z", _FLAGS)
_SUPPOSITION_BEFORE = re.compile(
    r"\b(?:" + _SUPPOSING + r"|(?:might|may|could|would)\s{1,4}(?:think|say|argue|believe|expect|claim)"
    r"|not\s{1,4}(?:sure|certain|clear|convinced)|unsure|unclear|uncertain|doubt(?:s|ful)?)\b"
    r"(?:(?!\b(?:but|however|so|therefore|thus|hence)\b)[^.?!\n;]){0,120}\Z",
    _FLAGS,
)
_ASIDE_REACH = 160  # characters looked back: the longest supposition clause above, and its word

# Where a label or a restated question may begin: a line (after list markup) or a sentence. The
# boundary is consumed rather than looked behind at, which lets the scan jump from one candidate
# to the next (a pattern that opens with an assertion is tried at every character); `_decide`
# starts each region with a newline so that its first line counts too.
_BOUNDARIES = "\n.!?"
_SENTENCE_START = (
    r"[\n.!?](?:(?<=\n)|[*_`\"']{0,2}[ \t]{1,4})[ \t>#*_`+-]{0,8}(?:\d{1,2}[.)][ \t]{1,4})?"
)
# A label is a phrase of a few words that announces a conclusion by one of these.
_CUE = (
    r"(?:answer|conclu(?:sion|de|ding)|verdict|decision|judge?ment|therefore|thus|hence|so|overall"
    r"|summary|summari[sz]e|sum[ \t]{1,4}up|short|in[ \t]{1,4}the[ \t]{1,4}end|finally|ultimately"
    r"|based[ \t]{1,4}on"
    r"|analysis|reflection|consideration"
    r"|re-?check\w*|double-?check\w*|re-?examin\w*|reconsider\w*|hypothesis|bottom[ \t]{1,4}line|tl;[ \t]?dr)"
)
_LABEL_WORD = r"[a-z][\w'-]{0,20}"
# A noun phrase ("Verdict on the hypothesis"), not a clause ("The hypothesis is not"), and no
# supposition ("If so").
_LABEL = (
    r"(?!" + _SUPPOSING + r"\b)"
    r"(?:" + _LABEL_WORD + r"[ \t]{1,4}){0,4}?\b" + _CUE + r"\b"
    r"(?:[ \t]{1,4}(?!(?:is|are|was|were|be|not|does|do|did|can|cannot|may|might|must|should|would|will"
    r"|seems?)\b)" + _LABEL_WORD + r"){0,4}"
)


def _labelled(stop: str, separator: str, ending: str = "") -> str:
    """A label, its separator and the word. Before the label is tried, a plain scan of the sentence
    must reach one of the `stop` characters: most sentences hold no separator and fail at once."""
    return (
        _SENTENCE_START + r"(?=[^.?!" + stop + r"]{0,120}[" + stop + r"])" + _LABEL + separator
        + r"[ \t\n*_`\"'\[(]{0,8}" + _WORD + _COMMITTED + ending
    )


# A value of None means the answer is the matched word itself.
_EXPLICIT: list[tuple[re.Pattern[str], Answer | None]] = [
    (
        re.compile(
            r"(?<![a-z0-9])(?:final[ \t_]+)?answer(?![a-z0-9])" + _DECOR + r"{0,4}[ \t]{0,4}"
            r"(?::|=|" + _DASH + r"|(?:is|(?:would|should|must)[ \t]{1,4}be)\b[ \t]{0,4}:?)"
            r"[ \t\n*_`\"'\[(]{0,8}" + _WORD + _COMMITTED,
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
    # A colon or dash after the label, or the label alone on its line as a heading.
    (
        re.compile(
            _labelled(
                "\n:\u2013\u2014-", r"(?:[*_`]{0,4}[ \t]{0,4}(?::|" + _DASH + r")|[*_`:#= \t]{0,8}(?=\n))"
            ),
            _FLAGS,
        ),
        None,
    ),
    # A question about the hypothesis, answered at once. The sentence must end in a question mark
    # (checked first, by a plain scan) and name the hypothesis, necessity or inference.
    (
        re.compile(
            _SENTENCE_START
            + r"(?=[^.?!\n]{0,200}\?)(?:[a-z]{1,8},?[ \t]{1,4}){0,2}?(?:is|are|does|do|can|could|must|would|will"
            r"|should)\b"
            r"(?=[^.?!\n]{0,200}?\b(?:hypothesis|claim|necessarily|valid|impl(?:y|ies|ied)|entail\w*"
            r"|conclude|infer\w*|deduce)\b)"
            r"[^.?!\n]{0,200}\?" + _DECOR + r"{0,4}\s{0,4}(?:[:\u2013\u2014-][ \t]{0,4})?[*_`\"'\[(]{0,4}"
            + _WORD + _COMMITTED,
            _FLAGS,
        ),
        None,
    ),
]

_SUBJECT = (
    r"\b(?:the|this)" + _GAP + r"(?:(?:causal|given|proposed|stated)" + _GAP + r")?"
    r"(?:hypothesis|claim|statement)"
    r"(?:\s{1,4}that\s[^.\n]{0,150}?|\s{0,4}\([^()\n]{0,150}\)|,?\s{0,4}\"[^\"\n]{0,150}\",?"
    r"|\s{0,4}'[^'\n]{0,150}')?"
)
_ADVERB = r"(?:(?:necessarily|therefore|thus|hence|indeed|always|clearly)" + _GAP + r")?"
# A phrase that goes on to a condition, an alternative or a question does not decide.
_UNQUALIFIED = (
    r"(?![*_`\"']{0,4}[ \t]{0,4}(?:\?|/|,?[ \t]{0,4}(?:" + _CONDITIONAL
    + r"|only|in[ \t]{1,4}(?:some|one|certain)|for[ \t]{1,4}some|under[ \t]{1,4}some)\b))"
)


def _loose(body: str, value: Answer) -> tuple[re.Pattern[str], Answer]:
    return re.compile(body + _UNQUALIFIED, _FLAGS), value


_NEGATED_BE = (
    r"(?:is" + _GAP + _ADVERB + r"not|isn't"
    r"|(?:cannot|can't|can" + _GAP + r"not|may" + _GAP + r"not|might" + _GAP + r"not|need" + _GAP + r"not)"
    + _GAP + r"be)"
)

_LOOSE: list[tuple[re.Pattern[str], Answer | None]] = [
    _loose(
        _SUBJECT + _GAP + _NEGATED_BE + _GAP + r"(?:(?:necessarily|always)" + _GAP + r")?"
        r"(?:true|valid|correct|implied|entailed|supported|guaranteed)\b",
        "no",
    ),
    _loose(_SUBJECT + _GAP + r"is" + _GAP + _ADVERB + r"(?:false|invalid|incorrect|unsupported)\b", "no"),
    _loose(
        _SUBJECT + _GAP
        + r"(?:does" + _GAP + r"not|doesn't|need" + _GAP + r"not|cannot|can't|can" + _GAP + r"not)" + _GAP
        + r"(?:necessarily" + _GAP + r")?(?:hold|follow)\b",
        "no",
    ),
    # What cannot be concluded must be the hypothesis, not "anything" or "either way".
    _loose(
        r"\b(?:cannot|can't|can" + _GAP + r"not)" + _GAP + r"(?:necessarily" + _GAP + r")?"
        r"(?:be" + _GAP + r"(?:necessarily" + _GAP + r")?(?:inferred|concluded|deduced|established)"
        r"|infer|conclude|deduce)\b"
        r"(?![ \t]{1,4}(?:either|anything|whether|which|with[ \t]{1,4}certainty"
        r"|for[ \t]{1,4}(?:sure|certain)|definitively|one[ \t]{1,4}way))",
        "no",
    ),
    _loose(
        _SUBJECT + _GAP + r"(?:is|must" + _GAP + r"be)" + _GAP + _ADVERB
        + r"(?:true|valid|correct|implied|entailed|guaranteed)\b",
        "yes",
    ),
    _loose(_SUBJECT + _GAP + r"(?:necessarily" + _GAP + r")?(?:follows|holds)\b", "yes"),
    # A line opening with the word set off: alone on the line, followed by a dash, or wrapped in
    # emphasis of its own ("**No.** The premise ..."). A colon is not enough: "Yes: B is a
    # collider" answers a step of the reasoning.
    (
        re.compile(
            r"^[ \t>#]{0,8}(?P<em>\*\*|__|\*|_)?[`\"']{0,2}" + _WORD + _COMMITTED
            + r"(?:[*_`\"'.!]{0,6}[ \t]{0,20}$|" + _DECOR + r"{0,4}[ \t]{0,4}" + _DASH
            + r"|[`\"']{0,2}[.!]?(?P=em))",
            _FLAGS | re.MULTILINE,
        ),
        None,
    ),
    # A region that opens with the word. "True, ..." and "Valid, ..." concede a point, so only
    # Yes/No may be followed by a comma.
    (
        re.compile(
            r"\A\s{0,20}[*_`\"'#]{0,4}"
            r"(?=(?:yes|no)(?![a-z0-9])|(?:true|false|valid|invalid)" + _DECOR + r"{0,4}[ \t]{0,4}[.!;:\u2013\u2014-])"
            + _WORD + _COMMITTED + _DECOR + r"{0,4}[ \t]{0,4}[.,!;:\u2013\u2014-]",
            _FLAGS,
        ),
        None,
    ),
    # A concluding phrase, a comma, and the word as the whole rest of its sentence.
    (
        re.compile(
            _labelled("\n,", r"[*_`]{0,4}[ \t]{0,4},", r"[*_`\"']{0,4}[ \t]{0,4}(?:[.!:;]|$|" + _DASH + ")"),
            _FLAGS | re.MULTILINE,
        ),
        None,
    ),
]


def extract_answer(text: str) -> Answer:
    """The decision a grader should score, or "none" when the text commits to none."""
    if not text:
        return "none"
    text = unicodedata.normalize("NFKC", text).translate(_TYPOGRAPHY)
    closes = list(_THINK_CLOSE.finditer(text))
    if not closes:
        return "none" if _THINK_OPEN.search(text) else _decide(text)
    last_close = closes[-1]
    after = _decide(text[last_close.end() :])
    if after != "none":
        return after
    return _decide(_THINK_OPEN.sub("", text[: last_close.start()]))


def _decide(region: str) -> Answer:
    region = "\n" + region
    explicit = _last(region, _EXPLICIT)
    if explicit is not None:
        return explicit
    loose = _last(region, _LOOSE)
    return loose if loose is not None else "none"


def _last(region: str, patterns: list[tuple[re.Pattern[str], Answer | None]]) -> Answer | None:
    best_start, best = -1, None
    for pattern, value in patterns:
        for match in pattern.finditer(region):
            start = match.start()
            if start <= best_start:
                continue
            # A statement that opens a sentence has nothing before it in its clause.
            if region[start] not in _BOUNDARIES and _is_aside(region[max(0, start - _ASIDE_REACH) : start]):
                continue
            best_start = start
            best = value if value is not None else _WORD_TO_ANSWER[match["word"].lower()]
    return best


def _is_aside(before: str) -> bool:
    return bool(_ALTERNATIVE_BEFORE.search(before) or _SUPPOSITION_BEFORE.search(before))


def answer_to_label(answer: Answer) -> int | None:
    """Corr2Cause's gold encoding, so a read answer can be compared with the dataset directly."""
    try:
        return _ANSWER_TO_LABEL[answer]
    except KeyError:
        raise ValueError(f"not an answer: {answer!r}") from None
