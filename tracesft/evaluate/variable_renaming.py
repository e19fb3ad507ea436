"""The robustness variant of an eval set: the same problems with their variables renamed.

A model that has learned the reasoning, not the surface of the training problems, should not care
whether the variables are called A, B, C or Z, Y, X. Renaming maps the i-th letter of the alphabet
to the i-th from the end (A→Z, B→Y, …), the same way in premise and hypothesis, and leaves the
label unchanged. Only the variables the premise declares ("a closed system of 3 variables, A, B and
C") are renamed, and only where they stand as whole tokens, so capitals inside words ("All",
"Premise", "However") are never touched.
"""

from __future__ import annotations

import re
import string

from tracesft.errors import TracesftError

_DECLARATION = re.compile(r"closed system of \d+ variables?,\s*(?P<names>[^.]*?)\.")
_NAME = re.compile(r"\b[A-Z]\b")


def mirrored(name: str) -> str:
    """A→Z, B→Y, …, Z→A."""
    return string.ascii_uppercase[-1 - string.ascii_uppercase.index(name)]


def declared_variables(query: str) -> list[str]:
    """The variable names a Corr2Cause premise declares, in order; [] when it declares none."""
    match = _DECLARATION.search(query)
    return _NAME.findall(match["names"]) if match else []


def rename_variables(query: str, where: str = "query") -> str:
    """`query` with every declared variable renamed by `mirrored`, all at once (no chained swaps)."""
    names = set(declared_variables(query))
    if not names:
        raise TracesftError(
            f"{where}: the premise declares no variables ('a closed system of N variables, A, B, ...'), "
            "so its variables cannot be renamed; turn `evaluation.renamed_variables` off for this eval set."
        )
    return _NAME.sub(lambda m: mirrored(m[0]) if m[0] in names else m[0], query)
