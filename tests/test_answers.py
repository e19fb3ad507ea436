import time

import pytest

from tracesft.data.answers import answer_to_label, extract_answer

GPT4_NO = """Let's analyze the causal structure implied by the premise.

1. A correlates with C, and B correlates with C.
2. A and B are independent of each other.
3. A and B become dependent given C.

This is a collider: A -> C <- B. There is no edge between A and B.

Therefore, the hypothesis that A directly causes B is not necessarily true.

Answer: No"""

R1_HESITATION = """<think>
Okay, so the premise says A correlates with B, and B correlates with C, but A and C are
independent given B. Hmm, so maybe the answer is yes, because B mediates everything.

Wait, no. A chain and a fork give the same independencies, so the direction is not identified.
So the hypothesis does not necessarily hold.
</think>

The observed independencies are consistent with A -> B -> C and with A <- B -> C, so the
direction of the edge cannot be determined.

**Answer:** No"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Explicit answer lines, with the decorations GPT-4 and R1 put around them.
        pytest.param("Answer: Yes", "yes", id="plain-answer-yes"),
        pytest.param("answer: no", "no", id="lowercase"),
        pytest.param("ANSWER: YES.", "yes", id="uppercase-trailing-period"),
        pytest.param(GPT4_NO, "no", id="gpt4-reasoning-then-answer-line"),
        pytest.param("Reasoning...\n\nFinal answer: Yes!", "yes", id="final-answer"),
        pytest.param("...so the collider blocks the path.\n\n**Answer:** **No**", "no", id="bold"),
        pytest.param("**Final Answer**: *Yes*", "yes", id="bold-label-italic-word"),
        pytest.param("Answer: `No`", "no", id="backticks"),
        pytest.param("Answer: __Yes__", "yes", id="underscore-bold"),
        pytest.param("Answer:\nNo", "no", id="word-on-next-line"),
        pytest.param("The final answer is **No**.", "no", id="the-answer-is"),
        pytest.param("Answer: True", "yes", id="true-maps-to-yes"),
        pytest.param("Answer: Invalid", "no", id="invalid-maps-to-no"),
        pytest.param("Answer: No, because a confounder explains the correlation.", "no", id="comma-then-why"),
        # Boxed answers, as R1 writes them after the think block.
        pytest.param("</think>\n\n**Final Answer**\n\\boxed{No}", "no", id="boxed"),
        pytest.param("Thus \\boxed{\\text{Yes}}", "yes", id="boxed-text"),
        pytest.param("\\boxed{ \\textbf{no} }", "no", id="boxed-textbf-spaces"),
        # JSON answers from structured-output runs.
        pytest.param('{"reasoning": "A and B share a cause C.", "answer": "no"}', "no", id="json-string"),
        pytest.param('```json\n{"answer": true}\n```', "yes", id="json-bool"),
        pytest.param("{'final_answer': 'Yes'}", "yes", id="python-dict-final-answer"),
        # Loose phrases when no explicit marker is written.
        pytest.param("Given the premises, the hypothesis is necessarily true.", "yes", id="necessarily-true"),
        pytest.param("Hence the hypothesis is false.", "no", id="hypothesis-false"),
        pytest.param("So the hypothesis is not valid.", "no", id="not-valid"),
        pytest.param("This makes the hypothesis invalid? No: the hypothesis is invalid.", "no", id="invalid"),
        pytest.param("Under faithfulness the hypothesis is valid.", "yes", id="valid"),
        pytest.param("Because of the fork, the hypothesis does not necessarily hold.", "no", id="not-hold"),
        pytest.param("The claim doesn't follow from the correlations alone.", "no", id="not-follow"),
        pytest.param("A causal link between A and C cannot be inferred.", "no", id="cannot-be-inferred"),
        pytest.param("Therefore it cannot necessarily be concluded that B causes D.", "no", id="cannot-conclude"),
        pytest.param("The hypothesis is implied by the conditional independencies.", "yes", id="implied"),
        pytest.param("With only one DAG consistent, the hypothesis follows necessarily.", "yes", id="follows"),
        pytest.param(
            'The hypothesis "A directly causes B" is not necessarily true.', "no", id="quoted-hypothesis"
        ),
        pytest.param("No. A and B could share a common cause.", "no", id="leading-no"),
        pytest.param("The only graph is A -> B.\n\n**Yes**", "yes", id="bare-final-line"),
        # R1 outputs: the post-think answer overrides hesitation inside the think block.
        pytest.param(R1_HESITATION, "no", id="r1-think-hesitation-overridden"),
        pytest.param(
            "<think>\nThe answer is no... wait, only one DAG fits. So the answer is yes.\n</think>\n\nAnswer: Yes",
            "yes",
            id="r1-think-says-no-first",
        ),
        pytest.param(
            "<think>\nAll Markov-equivalent graphs contain A -> B, so the hypothesis is necessarily true.\n"
            "</think>\n\n",
            "yes",
            id="r1-fallback-to-think",
        ),
        pytest.param(
            "Reasoning about the skeleton...\n</think>\nAnswer: No",
            "no",
            id="r1-template-opened-think",
        ),
        # The last decision wins.
        pytest.param("Answer: Yes... wait, actually Answer: No", "no", id="last-explicit-wins"),
        pytest.param(
            "At first the hypothesis is valid. Rechecking the v-structure, the hypothesis is not valid.",
            "no",
            id="last-loose-wins",
        ),
        pytest.param(
            "The hypothesis is not necessarily true... but A is the only parent, so the hypothesis is "
            "necessarily true.",
            "yes",
            id="last-loose-wins-yes",
        ),
        # An explicit marker outranks prose around it, even prose that comes later.
        pytest.param(
            "Answer: No\n\nExplanation: one might think the hypothesis is valid, but C confounds A and B.",
            "no",
            id="explicit-beats-later-justification",
        ),
        # Labels, dashes and restated questions.
        pytest.param("Answer - No", "no", id="answer-dash"),
        pytest.param("Answer — Yes, the collider fixes it.", "yes", id="answer-em-dash"),
        pytest.param("Therefore: No", "no", id="label-therefore"),
        pytest.param("Conclusion: Yes, the collider fixes A -> C.", "yes", id="label-conclusion"),
        pytest.param("**Final verdict:** Invalid", "no", id="label-verdict-invalid"),
        pytest.param("Reasoning.\n\n## Final Answer\n\nNo. The chain fits too.", "no", id="label-heading"),
        pytest.param("B may be a mediator. Let me think again. After careful analysis: No.", "no", id="label-after-analysis"),
        pytest.param("In conclusion, no.", "no", id="label-comma-whole-sentence"),
        pytest.param("Is the hypothesis valid? Yes.", "yes", id="restated-question"),
        pytest.param("Can we conclude that B causes D?\n\n**No** — a chain fits too.", "no", id="restated-question-next-line"),
        pytest.param("</think>\n\n**Yes** — A directly causes C.", "yes", id="bold-word-then-dash"),
        pytest.param("Reasoning.\n\n**No.** The chain C -> B -> A fits too.", "no", id="emphasised-line-opening"),
        pytest.param("Reasoning.\n\nValid.", "yes", id="valid-line"),
        pytest.param("Reasoning.\n\n*Invalid*", "no", id="invalid-line"),
        pytest.param("invalid — the reversed chain fits too.", "no", id="region-opens-with-invalid"),
        pytest.param("The hypothesis is **not** valid.", "no", id="emphasis-inside-phrase"),
        # Typography of other keyboards and locales.
        pytest.param("Answer: «No»", "no", id="guillemets"),
        pytest.param("Final answer: „Yes“", "yes", id="low-high-quotes"),
        pytest.param("Answer: ‘No’.", "no", id="curly-single-quotes"),
        pytest.param("Answer：Ｙｅｓ。", "yes", id="full-width"),
        # No decision: none.
        pytest.param("", "none", id="empty"),
        pytest.param("I'm not sure; it depends on unobserved variables.", "none", id="hedged"),
        pytest.param("There is no edge between A and B, and yes, they are independent.", "none", id="no-edge-trap"),
        pytest.param("We must check whether the hypothesis is necessarily true.", "none", id="whether-question"),
        pytest.param("If the hypothesis is true, then A and C must be correlated.", "none", id="supposition"),
        pytest.param("Give the final answer as 'Answer: Yes' or 'Answer: No'.", "none", id="echoed-instruction"),
        pytest.param("The answer is yes or no depending on C.", "none", id="yes-or-no"),
        pytest.param("The answer is no longer obvious once we condition on C.", "none", id="no-longer"),
        pytest.param("The hypothesis is not necessarily false.", "none", id="not-necessarily-false"),
        pytest.param(
            "<think>\nOkay, A correlates with B. Maybe the answer is yes. Hmm, let me check the collider",
            "none",
            id="unclosed-think-cut-off",
        ),
        pytest.param("<think>\nHmm, I'm not sure where the edge goes", "none", id="unclosed-think-hedged"),
        pytest.param("<think>\nLet me think.\n</think>\n\nI cannot decide.", "none", id="closed-think-no-decision"),
        # Not set off, qualified, retracted or supposed: none.
        pytest.param("Conclusion: No conditional independence involves D.", "none", id="label-word-runs-on"),
        pytest.param("The conclusion is not clear: yes, A and C are dependent, but the rest is open.", "none", id="clause-is-no-label"),
        pytest.param("Therefore, no edge exists between A and D.", "none", id="comma-word-runs-on"),
        pytest.param("Is A correlated with C? Yes. Is B a collider? No.", "none", id="question-not-about-hypothesis"),
        pytest.param("Let me check.\nYes: B is a collider.", "none", id="colon-after-line-word-is-a-step"),
        pytest.param("True, A correlates with B, but the direction is open.", "none", id="concessive-true"),
        pytest.param("Answer: Yes, if B is a collider.", "none", id="qualified-by-if"),
        pytest.param("Answer: No (probably).", "none", id="qualified-by-probably"),
        pytest.param("Answer: Yes?", "none", id="question-mark"),
        pytest.param("Answer: Yes.\n\nWait, C could be a collider.", "none", id="retracted-next-line"),
        pytest.param("If B is a collider, the answer is yes.", "none", id="supposition-before-marker"),
        pytest.param("Maybe the answer is yes.", "none", id="maybe-before-marker"),
        pytest.param("One might think the hypothesis is valid.", "none", id="opinion"),
        pytest.param("I'm not sure that the hypothesis is true.", "none", id="not-sure-that"),
        pytest.param("The hypothesis holds only if B is a confounder.", "none", id="phrase-qualified-after"),
        pytest.param("I will write 'Answer: Yes' if it follows, otherwise 'Answer: No'.", "none", id="echoed-format-otherwise"),
        pytest.param("I cannot conclude either way.", "none", id="cannot-conclude-either-way"),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


def test_long_adversarial_input_is_fast() -> None:
    pathological = [
        "Answer" + " " * 20_000,
        "the hypothesis that " + "A" * 20_000,
        "\\boxed{" + " " * 20_000,
        "no " * 7_000,
        ("*" * 50 + "Answer:" + "*" * 50 + " ") * 200,
        "if " * 10_000,  # suppositions looked back from every match
        "Is " * 10_000 + "?",  # question openings
        ("So " * 5 + ". ") * 2_000,  # sentence starts that look like labels
        "yes\n" * 2_000,  # lines that all decide
        "Yes" + " " * 20_000,  # what follows an answer word, checked for qualifiers
    ]
    start = time.perf_counter()
    for text in pathological:
        extract_answer(text)
    extract_answer(GPT4_NO * 30)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(("answer", "label"), [("yes", 1), ("no", 0), ("none", None)])
def test_answer_to_label(answer: str, label: int | None) -> None:
    assert answer_to_label(answer) == label


@pytest.mark.parametrize("bad", ["maybe", "Yes", ""])
def test_answer_to_label_rejects_non_answers(bad: str) -> None:
    with pytest.raises(ValueError):
        answer_to_label(bad)
