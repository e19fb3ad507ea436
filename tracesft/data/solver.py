"""The exact Corr2Cause solver: which causal graphs fit the premise, and does the hypothesis hold in all?

Corr2Cause's assumptions make the answer a finite computation. The system is closed (no hidden
common causes), the distribution is faithful to its DAG, and the premise lists ALL the statistical
relations, so the independences in the premise are exactly the DAG's d-separations. The DAGs with
that set of d-separations form one Markov equivalence class (MEC), and the hypothesis "necessarily
follows" (label 1) exactly when it holds in every DAG of the class.

Rather than test all ~3.8M DAGs over 6 variables, the class is built the way the PC algorithm
reads it off an independence oracle (Verma & Pearl: same skeleton and same v-structures means
Markov equivalent):

1. skeleton: two variables are adjacent iff no set separates them;
2. v-structures: for non-adjacent x, y with a common neighbour z, z is a collider iff it is in
   none of the sets that separate x and y (under faithfulness it is then in all or none of them);
3. members: every acyclic orientation of the skeleton with exactly those v-structures, found by
   backtracking with cycle and v-structure pruning;
4. faithfulness check: the d-separations of a member must equal the premise's independences, or
   the premise cannot come from any DAG and is rejected as inconsistent. (Correlation statements
   only restate marginal dependence: a pair not stated independent counts as dependent, and the
   parser already rejects a pair stated both correlated and independent.)

Relations are decided on each member the way Corr2Cause's generator classifies paths between the
two variables (its `compute_relation`): a direct edge; a directed path of length two or more
("causes something else which causes", also worded "is a cause for ..., but not a direct one");
a common effect reached by directed paths that share only that node; a common cause likewise.
Variables are indexed in sorted name order only to build bitmasks; the MEC itself does not depend
on names or their order, which the tests check by renaming and permuting.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

from tracesft.data.corr2cause import (
    CHILD,
    HAS_COLLIDER,
    HAS_CONFOUNDER,
    NON_CHILD_DESCENDANT,
    NON_PARENT_ANCESTOR,
    PARENT,
    Hypothesis,
    MalformedProblemError,
    Premise,
    Problem,
    parse_problem,
)
from tracesft.evaluate.eval_set import EvalProblem


class InconsistentPremiseError(MalformedProblemError):
    """No DAG has exactly the premise's independences (an unfaithful or self-contradicting premise)."""


@dataclass(frozen=True)
class Dag:
    names: tuple[str, ...]  # sorted; index i is bit 1 << i
    parents: tuple[int, ...]  # parents[i]: bitmask of i's parents

    def edges(self) -> list[tuple[str, str]]:
        return [(self.names[p], self.names[c]) for c in range(len(self.names)) for p in _bits(self.parents[c])]


@dataclass(frozen=True)
class Verdict:
    label: int  # 1: the hypothesis holds in every DAG of the class
    class_size: int
    holding: int  # how many DAGs of the class satisfy the hypothesis
    hypothesis: Hypothesis

    def explain(self) -> str:
        return f"{self.hypothesis} holds in {self.holding} of {self.class_size} DAG(s) of the equivalence class"


def solve_text(text: str) -> Verdict:
    """Parse and solve one problem text (raises `MalformedProblemError` if it cannot be read)."""
    return _solve_text_cached(" ".join(text.split()))


@lru_cache(maxsize=65536)
def _solve_text_cached(normalized: str) -> Verdict:
    return solve(parse_problem(normalized))


def clear_caches() -> None:
    """Forget every solved problem and equivalence class (for cold-start measurements)."""
    _solve_text_cached.cache_clear()
    equivalence_class.cache_clear()
    d_separations.cache_clear()


def solve(problem: Problem) -> Verdict:
    members = equivalence_class(problem.premise)
    holding = sum(holds(dag, problem.hypothesis) for dag in members)
    return Verdict(
        label=int(holding == len(members)), class_size=len(members), holding=holding, hypothesis=problem.hypothesis
    )


@lru_cache(maxsize=8192)
def equivalence_class(premise: Premise) -> tuple[Dag, ...]:
    """Every DAG whose d-separations are exactly the premise's independences."""
    names = tuple(sorted(premise.variables))
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    separating: dict[tuple[int, int], list[int]] = {}
    for independence in premise.independences:
        i, j = sorted(index[v] for v in independence.pair)
        separating.setdefault((i, j), []).append(_mask(index[v] for v in independence.given))
    adjacent = [0] * n
    for i, j in combinations(range(n), 2):
        if (i, j) not in separating:
            adjacent[i] |= 1 << j
            adjacent[j] |= 1 << i
    colliders: set[tuple[int, int, int]] = set()  # (x, z, y) with x < y: x -> z <- y
    for (x, y), sets in separating.items():
        for z in _bits(adjacent[x] & adjacent[y]):
            inside = sum(1 for s in sets if s >> z & 1)
            if 0 < inside < len(sets):
                raise InconsistentPremiseError(
                    f"{names[z]} separates {names[x]} and {names[y]} in some stated independences but not in others, "
                    "which no faithful DAG allows."
                )
            if inside == 0:
                colliders.add((x, z, y))
    members = tuple(_orientations(n, adjacent, colliders, names))
    if not members:
        raise InconsistentPremiseError("no DAG has the skeleton and v-structures these independences imply.")
    stated = {(_mask(index[v] for v in ind.pair), _mask(index[v] for v in ind.given)) for ind in premise.independences}
    implied = d_separations(members[0])
    if implied != stated:
        missing, extra = implied - stated, stated - implied
        example = _describe(names, next(iter(missing or extra)))
        raise InconsistentPremiseError(
            f"the independences are not those of any DAG: e.g. {example} is "
            f"{'implied but not stated' if missing else 'stated but not implied'} (the premise must list all of them)."
        )
    return members


def _orientations(n: int, adjacent: list[int], colliders: set[tuple[int, int, int]], names: tuple[str, ...]):
    """Acyclic orientations of the skeleton whose v-structures are exactly `colliders`."""
    edges = [(i, j) for i in range(n) for j in _bits(adjacent[i]) if i < j]
    required_parents = [0] * n
    for x, z, y in colliders:
        required_parents[z] |= (1 << x) | (1 << y)
    for i, j in edges:
        if required_parents[i] >> j & 1 and required_parents[j] >> i & 1:
            raise InconsistentPremiseError(
                f"the v-structures orient the edge between {names[i]} and {names[j]} both ways."
            )
    parents = [0] * n

    def acceptable(child: int, parent: int) -> bool:
        # The new edge parent -> child must not close a cycle, nor contradict a required collider
        # at the parent, nor form an unshielded collider at the child with a node that is in no
        # required collider there. This prunes cheaply; the exact v-structure check is at the end.
        if required_parents[parent] >> child & 1:
            return False
        if _reaches(parents, child, parent):
            return False
        for other in _bits(parents[child]):
            if not adjacent[other] >> parent & 1 and not required_parents[child] >> parent & 1:
                return False
        return True

    def place(k: int):
        if k == len(edges):
            yield Dag(names=names, parents=tuple(parents))
            return
        i, j = edges[k]
        for parent, child in ((i, j), (j, i)):
            if acceptable(child, parent):
                parents[child] |= 1 << parent
                yield from place(k + 1)
                parents[child] &= ~(1 << parent)

    for dag in place(0):
        if _v_structures(dag, adjacent) == colliders:
            yield dag


def _v_structures(dag: Dag, adjacent: list[int]) -> set[tuple[int, int, int]]:
    found = set()
    for z, pa in enumerate(dag.parents):
        for x, y in combinations(_bits(pa), 2):
            if not adjacent[x] >> y & 1:
                found.add((x, z, y))
    return found


@lru_cache(maxsize=65536)
def d_separations(dag: Dag) -> frozenset[tuple[int, int]]:
    """All (pair mask, conditioning mask) with the pair d-separated given the set."""
    n = len(dag.names)
    children = _children_masks(dag)
    result = set()
    for given in range(1 << n):
        for x in range(n):
            if given >> x & 1:
                continue
            connected = _d_connected_to(dag.parents, children, x, given)
            for y in range(x + 1, n):
                if not (given >> y & 1 or connected >> y & 1):
                    result.add(((1 << x) | (1 << y), given))
    return frozenset(result)


def _d_connected_to(parents: tuple[int, ...], children: tuple[int, ...], x: int, given: int) -> int:
    """Bitmask of the nodes with an active trail from x given `given` (Koller & Friedman, alg. 3.1).

    A trail may pass a node upwards (entered from a child) or downwards (entered from a parent);
    an unobserved node passes both ways except that a downward pass cannot turn up again, and a
    collider passes (down to up) only when it or a descendant is observed.
    """
    opens_colliders = given
    frontier = given
    while frontier:  # the observed nodes and their ancestors
        low = frontier & -frontier
        frontier ^= low
        new = parents[low.bit_length() - 1] & ~opens_colliders
        opens_colliders |= new
        frontier |= new
    reached = 0
    up, down = 1 << x, 0  # nodes to leave upwards / downwards
    seen_up, seen_down = 0, 0
    while up or down:
        if up:
            low = up & -up
            up ^= low
            if seen_up & low:
                continue
            seen_up |= low
            if not given & low:
                v = low.bit_length() - 1
                reached |= low
                up |= parents[v] & ~seen_up
                down |= children[v] & ~seen_down
        else:
            low = down & -down
            down ^= low
            if seen_down & low:
                continue
            seen_down |= low
            v = low.bit_length() - 1
            if not given & low:
                reached |= low
                down |= children[v] & ~seen_down
            if opens_colliders & low:
                up |= parents[v] & ~seen_up
    return reached


def _children_masks(dag: Dag) -> tuple[int, ...]:
    children = [0] * len(dag.names)
    for c, pa in enumerate(dag.parents):
        for p in _bits(pa):
            children[p] |= 1 << c
    return tuple(children)


def holds(dag: Dag, hypothesis: Hypothesis) -> bool:
    x, y = dag.names.index(hypothesis.x), dag.names.index(hypothesis.y)
    template = hypothesis.template
    if template == PARENT:
        return bool(dag.parents[y] >> x & 1)
    if template == CHILD:
        return bool(dag.parents[x] >> y & 1)
    if template == NON_PARENT_ANCESTOR:
        return _causes_through_another(dag, x, y)
    if template == NON_CHILD_DESCENDANT:
        return _causes_through_another(dag, y, x)
    if template == HAS_COLLIDER:
        return bool(_descendants(dag, x, without=y) & _descendants(dag, y, without=x) & ~((1 << x) | (1 << y)))
    if template == HAS_CONFOUNDER:
        return bool(_ancestors(dag, x, without=y) & _ancestors(dag, y, without=x) & ~((1 << x) | (1 << y)))
    raise ValueError(f"unknown template {template!r}")


def _causes_through_another(dag: Dag, x: int, y: int) -> bool:
    """A directed path x -> c -> ... -> y with at least one node in between."""
    return any(_descendants(dag, c, without=x) >> y & 1 for c in _bits(_children(dag, x)) if c != y)


def _children(dag: Dag, v: int) -> int:
    return _mask(c for c, pa in enumerate(dag.parents) if pa >> v & 1)


def _descendants(dag: Dag, v: int, without: int) -> int:
    """v and every node reachable from it by a directed path that avoids `without`."""
    reached, frontier = 1 << v, 1 << v
    while frontier:
        u = (frontier & -frontier).bit_length() - 1
        frontier &= frontier - 1
        new = _children(dag, u) & ~reached & ~(1 << without)
        reached |= new
        frontier |= new
    return reached


def _ancestors(dag: Dag, v: int, without: int) -> int:
    """v and every node with a directed path into it that avoids `without`."""
    reached, frontier = 1 << v, 1 << v
    while frontier:
        u = (frontier & -frontier).bit_length() - 1
        frontier &= frontier - 1
        new = dag.parents[u] & ~reached & ~(1 << without)
        reached |= new
        frontier |= new
    return reached


def _reaches(parents: list[int], source: int, target: int) -> bool:
    """Is there a directed path source -> ... -> target in the partial orientation?"""
    n = len(parents)
    reached, frontier = 1 << source, 1 << source
    while frontier:
        u = (frontier & -frontier).bit_length() - 1
        frontier &= frontier - 1
        if u == target:
            return True
        new = _mask(c for c in range(n) if parents[c] >> u & 1) & ~reached
        reached |= new
        frontier |= new
    return False


def _describe(names: tuple[str, ...], statement: tuple[int, int]) -> str:
    pair, given = statement
    x, y = (names[i] for i in _bits(pair))
    return f"{x} ⫫ {y}" + (f" | {', '.join(names[i] for i in _bits(given))}" if given else "")


def _mask(indices) -> int:
    m = 0
    for i in indices:
        m |= 1 << i
    return m


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def agreement_report(problems: list[EvalProblem]) -> dict:
    """The solver against the gold labels of an eval set: `tracesft solve CSV --json`.

    `disagree` and `malformed` list 0-based data rows, as they always have; `disagree_lines` and
    `malformed_lines` list the same rows as lines of the CSV, the numbering every message uses.
    """
    agree, details, malformed = 0, [], []
    for problem in problems:
        where = {"row": problem.row, "line": problem.line, "template": problem.template}
        try:
            verdict = solve_text(problem.query)
        except MalformedProblemError as err:
            malformed.append(where | {"error": str(err)})
            continue
        if verdict.label == problem.label:
            agree += 1
            continue
        details.append(where | {"gold": problem.label, "solver": verdict.label, "derived": verdict.explain()})
    return {
        "rows": len(problems),
        "agree": agree,
        "disagree": [d["row"] for d in details],
        "disagree_lines": [d["line"] for d in details],
        "malformed": [m["row"] for m in malformed],
        "malformed_lines": [m["line"] for m in malformed],
        "disagreements": details,
        "malformed_rows": malformed,
        "distinct_premises": len({" ".join(p.query.partition("Hypothesis:")[0].split()) for p in problems}),
    }
