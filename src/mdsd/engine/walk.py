"""Tree drafting and node-by-node verification, in pure numpy (no model, no torch).

The engine (``mdsd.engine.decode``) gets probabilities from the models and calls these functions;
tests call the same functions to compute the *exact* law of what the engine emits
(``emission_law``), so the sampling code and the law it is checked against share every rule.

Rules (docs/theory.md §7):

* Each node's children are drawn from q(. | path to the node) by the draft law, with
  ``node_rule``: the number of children actually drafted is ``n_eff`` = the tree width, except
  that a law drawing distinct tokens drafts at most |supp q| of them (top-k / top-p / temperature 0
  can leave fewer tokens than the width), and any law drafts a single token when q is one-hot
  (temperature 0: the tree becomes the draft's greedy chain, verification the longest match).
  Unused child slots are marked invalid and never verified. ``spechub`` is defined for 2 drafts
  only; where a node drafts a single token it uses classic single-draft speculative sampling
  (law ``iid``, verifier ``rrs``). Every such choice depends on q only, so at every node the
  drafts are exactly distributed by the (law, n_eff) the verifier is told about: exactness holds.
* Verification starts at the root: run the verifier over the node's valid children with
  p(. | path); if it emits a child's token, descend into that child (the first child holding
  that token, a choice that does not look at the subtrees); otherwise the emitted (recovered)
  token ends the step. At a node without valid children (an accepted leaf), emit a bonus token
  from p(. | path).

Probabilities are ``SupportProbs`` (stored on their support, as the engine's top-k / top-p
transform makes them) or dense [V] vectors. Sampling (``draft_children``, ``walk``) works on the
supports: a node is verified on the union of the supports of p and q by the verifier's early-exit
sampler (``Verifier.sample``), never building the output law over the vocabulary. The exact
laws (``enumerate_children``, ``emission_law``) use the dense vectors and ``output_law``; tests
check that each sampler follows them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from mdsd.laws import DraftLaw, get_law
from mdsd.logits import SupportProbs, kernel_truncation, process_logits_row
from mdsd.sampling import categorical, uniform_source
from mdsd.sequence.chain import block_sample
from mdsd.verifiers import Verifier, resolve
from mdsd.verifiers.classic import (
    KSEQ,
    GreedyVerifier,
    Importance,
    RecursiveRejection,
    SampleCheck,
    SpecHubVerifier,
)
from mdsd.verifiers.optimal.verifier import (
    NodePlan,
    OptimalVerifier,
    PlanTable,
    node_plan,
    plan_table,
)

SINGLE_DRAFT = ("rrs", "iid")  # classic speculative sampling, for nodes drafting one token
ONE_DRAW_LAWS = ("iid", "without_replacement")  # one draft of these laws = one draw from q


@dataclass(frozen=True)
class NodeRule:
    """How one node drafts and verifies: n_eff drafts from ``law``, checked by ``verifier``;
    ``plan``: the optimal verifier's compiled node for rows whose q has ``support`` tokens
    (``node_plan``), made once per rule by ``RuleBook.rule`` (None otherwise)."""

    n_eff: int
    law: DraftLaw
    verifier: Verifier
    support: int = 0
    plan: NodePlan | None = None


class RuleBook:
    """The (law, verifier) of a run and the per-node rule; validated once.

    Raises ValueError naming ``law`` / ``verifier`` for unknown names or a verifier that is not
    exact for the law (``mdsd.verifiers.resolve``), and naming ``tree`` for a width the law cannot
    draft (spechub needs widths <= 2).
    """

    def __init__(self, law: str | None, verifier: str, widths: tuple[int, ...]):
        self.verifier, self.law = resolve(verifier, law)
        if self.law.name == "spechub" and max(widths) > 2:
            raise ValueError(f"law 'spechub' drafts 2 tokens per node; tree widths {widths} > 2")
        single_verifier, single_law = resolve(*SINGLE_DRAFT)
        self._single = NodeRule(1, single_law, single_verifier)
        self._cache: dict[tuple[int, int], NodeRule] = {}
        self._tables: dict[tuple[int, int], PlanTable] = {}

    def rule(self, width: int, support: int) -> NodeRule:
        """The rule of a node with ``width`` child slots whose q has ``support`` tokens."""
        key = (width, support)
        rule = self._cache.get(key)
        if rule is None:
            if support <= 1:
                n_eff = 1
            elif self.law.distinct:
                n_eff = min(width, support)
            else:
                n_eff = width
            if n_eff == 1 and self._single_draft_is_classic():
                rule = self._single
            elif isinstance(self.verifier, OptimalVerifier):
                plan = node_plan(self.law, n_eff, support)
                rule = NodeRule(n_eff, self.law, self.verifier, support, plan)
            else:
                rule = NodeRule(n_eff, self.law, self.verifier)
            self._cache[key] = rule
        return rule

    def plan_table(self, n: int, max_support: int) -> PlanTable:
        """The nodes of at most ``n`` drafts on q supports up to ``max_support`` that the
        optimal verifier's compiled walk (``_walk_numba.tree_walk``) serves with one threshold
        kernel (``mdsd.verifiers.optimal.verifier.plan_table``), made once per (n, max_support)."""
        key = (n, max_support)
        if key not in self._tables:
            self._tables[key] = plan_table(self.law, n, max_support)
        return self._tables[key]

    def _single_draft_is_classic(self) -> bool:
        """Nodes with one draft use classic speculative sampling: for spechub (defined for two
        drafts), and for ``optimal`` under a law whose one draft is one draw from q, where
        classic sampling attains alpha* = sum min(p, q) with an early exit and no fit."""
        if self.law.name == "spechub":
            return True
        return self.verifier.name == "optimal" and self.law.name in ONE_DRAW_LAWS

    def warm_up(self, widths: tuple[int, ...]) -> None:
        """Draft and verify one toy node per width (4 tokens, a private generator): loads the
        compiled samplers (numba's import and on-disk cache, about a second once per process)
        before decoding, so that it is not charged to the first step."""
        gen = np.random.default_rng(0)
        p, q = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.4, 0.3, 0.2, 0.1])
        for width in sorted(set(widths)):
            drafts, rule = draft_children(q, width, self, gen)
            verify_node(p, q, drafts, rule, gen)


def as_support(probs) -> SupportProbs:
    """A ``SupportProbs`` as is; a dense probability vector [V] wrapped (dense storage)."""
    if isinstance(probs, SupportProbs):
        return probs
    probs = np.asarray(probs, dtype=np.float64)
    return SupportProbs(None, probs, probs.size)


def support_of(q) -> int:
    return as_support(q).support_size


def draft_children(q, width: int, book: RuleBook, rng: np.random.Generator) -> tuple[np.ndarray, NodeRule]:
    """Draw the children of one node from q (``SupportProbs`` or [V]): (tokens [n_eff] in draw
    order, the node's rule).

    Drawn on q's support: zero-mass tokens are never drafted, and ascending token ids keep every
    law's tie-breaking by id, so the law is that of the dense q.
    """
    q = as_support(q)
    rule = book.rule(width, q.support_size)
    if rule.n_eff == 1:  # every law with one draft is one categorical draw from q
        local = np.array([categorical(q.values, rng)], dtype=np.int64)
    else:
        local = rule.law.sample_trusted(q.values, rule.n_eff, rng)  # n_eff <= q's support
    return (local if q.indices is None else q.indices[local]), rule


def node_output_law(p: np.ndarray, q: np.ndarray, drafts: np.ndarray, rule: NodeRule) -> np.ndarray:
    """pi(. | drafts) at one node: the law of the emitted token, float64 [V]."""
    return rule.verifier.output_law(p[None, :], q[None, :], drafts[None, :], rule.law)[0]


def common_support(p: SupportProbs, q: SupportProbs):
    """(tokens [K] or None, p [K], q [K]): both laws on the union of their supports.

    Tokens outside both supports have p = q = 0: no exact verifier emits them and no draft law
    draws them, so verifying on the union (ascending ids, which keeps tie-breaking by id) gives
    the full-vocabulary conditional law restricted to it (tested). Dense when either is dense.
    One compiled merge of the two id lists (``_walk_numba.merge_supports``); the numpy form is
    :func:`common_support_reference`.
    """
    if p.indices is None or q.indices is None:
        return None, p.dense(), q.dense()
    return _walk_kernels().merge_supports(p.indices, p.values, q.indices, q.values)


def common_support_reference(p: SupportProbs, q: SupportProbs):
    """:func:`common_support` by ``np.union1d`` and ``np.searchsorted``."""
    if p.indices is None or q.indices is None:
        return None, p.dense(), q.dense()
    tokens = np.union1d(p.indices, q.indices)
    p_local, q_local = np.zeros(tokens.size), np.zeros(tokens.size)
    p_local[np.searchsorted(tokens, p.indices)] = p.values
    q_local[np.searchsorted(tokens, q.indices)] = q.values
    return tokens, p_local, q_local


@dataclass(frozen=True)
class NodeVerdict:
    """One node's verification.

    token:      the emitted token (a child's token = accepted, else the recovered token).
    accepted:   whether ``token`` is one of the drafts.
    acceptance: P(accept | drafts) when computed exactly (``exact_acceptance=True``: the mass
                of pi(. | drafts) on the drafts), else ``float(accepted)`` (an unbiased estimate
                of the same number that costs nothing).
    """

    token: int
    accepted: bool
    acceptance: float


def verify_node(
    p, q, drafts: np.ndarray, rule: NodeRule, rng: np.random.Generator, exact_acceptance: bool = False
) -> NodeVerdict:
    """One draw from pi(. | drafts) at a node by the verifier's sampler, on the union support.

    The verifiers ``walk_rule`` names (recursive rejection sampling, greedy, SpecHub, K-SEQ,
    importance, sample_check) and the optimal verifier's compiled nodes
    (``mdsd.verifiers.optimal.verifier.node_plan``) run as one compiled call on the union support
    (``mdsd.engine._walk_numba``), which draws the token :func:`verify_node_reference` draws
    from the same generator (tested); other verifiers and nodes, and ``exact_acceptance``, run
    the reference."""
    if exact_acceptance:
        return verify_node_reference(p, q, drafts, rule, rng, exact_acceptance)
    p, q = as_support(p), as_support(q)
    verifier, kernels = rule.verifier, _walk_kernels()
    code = walk_rule(verifier)
    if isinstance(verifier, RecursiveRejection):
        uniforms = rng.random(drafts.size + 1)
        args = (uniforms, verifier.distinct)
        kernel = kernels.rejection_node
    elif code is not None:
        args = (rng.random(verifier.uniforms_per_row(drafts.size)), code)
        kernel = kernels.classic_node
    elif isinstance(verifier, OptimalVerifier) and (plan := _plan_of(rule, drafts.size, q.support_size)):
        args = (rng.random(plan.uniforms), plan.head, plan.tail)
        kernel = kernels.orders_node_on_union if plan.kind == "orders" else kernels.threshold_node_on_union
    else:
        return verify_node_reference(p, q, drafts, rule, rng)
    token = int(kernel(*_ids_values(p), *_ids_values(q), p.vocab, drafts, *args))
    accepted = token in drafts.tolist()
    return NodeVerdict(token, accepted, float(accepted))


def walk_rule(verifier: Verifier) -> int | None:
    """``_walk_numba.tree_walk``'s ``rule`` code of ``verifier`` (``_walk_numba``'s ``RULE_*``),
    the verifiers it and ``verify_node`` run as compiled nodes; None for the others (the optimal
    verifier, whose nodes are plans, sequence-level rules). SpecHub's nodes of one draft take
    classic sampling (``RuleBook``)."""
    kernels = _walk_kernels()
    if isinstance(verifier, RecursiveRejection):
        return kernels.RULE_RRS_WITHOUT_REPLACEMENT if verifier.distinct else kernels.RULE_RRS
    classic = (
        (GreedyVerifier, kernels.RULE_GREEDY),
        (KSEQ, kernels.RULE_KSEQ),
        (Importance, kernels.RULE_IMPORTANCE),
        (SampleCheck, kernels.RULE_SAMPLE_CHECK),
        (SpecHubVerifier, kernels.RULE_SPECHUB),
    )
    return next((code for kind, code in classic if isinstance(verifier, kind)), None)


def _plan_of(rule: NodeRule, n: int, support: int) -> NodePlan | None:
    """The optimal verifier's compiled node for n drafts on q's ``support``: the rule's own plan
    when the rule was made for such rows (``RuleBook.rule``: once per rule, not per node; Python
    in the decoding loop runs with cold caches, where ``node_plan`` took ~30 microseconds),
    else ``node_plan``."""
    if rule.n_eff == n and rule.support == support:
        return rule.plan
    return node_plan(rule.law, n, support)


def verify_node_reference(
    p, q, drafts: np.ndarray, rule: NodeRule, rng: np.random.Generator, exact_acceptance: bool = False
) -> NodeVerdict:
    """:func:`verify_node` through ``common_support`` and ``Verifier.sample`` (numpy arrays on
    the union support, the verifier's dispatch), for every verifier."""
    tokens, p_local, q_local = common_support(as_support(p), as_support(q))
    local = drafts if tokens is None else np.searchsorted(tokens, drafts)
    args = (p_local[None], q_local[None], local[None], rule.law)
    y_local = int(rule.verifier.sample(*args, rng)[0])
    token = y_local if tokens is None else int(tokens[y_local])
    accepted = token in drafts.tolist()  # a few drafts: plain Python, not a numpy reduction
    if exact_acceptance:
        pi = rule.verifier.output_law(*args)[0]
        acceptance = float(pi[np.unique(local)].sum())
    else:
        acceptance = float(accepted)
    return NodeVerdict(token, accepted, acceptance)


@dataclass
class DraftedSlots:
    """The engine's drafted tree: tokens in the fixed node slots of a ``DraftTree`` shape and the
    per-node rules (N = tree.num_nodes); ``TreeDecoder.sequence_tree`` converts it to the
    validated ``mdsd.sequence.DraftedTree`` over the valid nodes.

    tokens: [N] int64 (invalid slots hold a copy of a valid sibling token, never verified).
    valid:  [N] bool.
    rules:  node (-1 = root) -> NodeRule used to draft its children (only nodes with children).
    draft_probs: node (-1 = root) -> q the children were drawn from (``SupportProbs`` or [V]).
    chain_q: for a chain drafted in one call (``StaticLlamaRunner.sample_chain``), the same q
             as one array: (token ids [K] ascending, or empty for the whole vocabulary; values
             [N, W], row i the q of node i - 1), which ``walk_chain_softmax`` reads; else None.
    chain_kept: with ``chain_q`` under a top-k: [N, W] the positions in its token ids of each
             row's values (W = k, ascending); else None (W = K).
    tree_q:  for a tree drafted in one call (``StaticLlamaRunner.sample_tree``), its q as arrays:
             (token ids [K] ascending, or empty for the whole vocabulary; values [R, W]; zeros
             [R]; kept [R, W], empty where no top-k truncates; drafts [R] of each row's node), row r
             the q of the r-th node with children (the root, then valid nodes in ascending
             order), which ``walk_tree_softmax`` reads; else None.
    """

    tokens: np.ndarray
    valid: np.ndarray
    rules: Mapping
    draft_probs: Mapping
    chain_q: tuple[np.ndarray, np.ndarray] | None = None
    chain_kept: np.ndarray | None = None
    tree_q: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclass
class WalkResult:
    """Outcome of verifying one drafted tree.

    path:    accepted nodes, root to deepest.
    emitted: the emitted tokens: the accepted path's tokens then one recovered or bonus token.
    bonus:   True when the last token is a bonus token (the whole path to a leaf was accepted).
    expected_accept: per visited depth, the acceptance given the drafts: exact (mass of pi on
             the drafted tokens) with ``exact_acceptance``, else the 0/1 outcome.
    """

    path: list
    emitted: list
    bonus: bool
    expected_accept: list


def walk(
    tree,
    drafted: DraftedSlots,
    target_probs: Callable[[int], object],
    rng: np.random.Generator,
    *,
    exact_acceptance: bool = False,
) -> WalkResult:
    """Verify a drafted tree node by node; ``target_probs(node)`` gives p(. | path to node)
    (``SupportProbs`` or [V]) and is called only for the nodes the walk visits."""
    node, path, expected = -1, [], []
    valid = drafted.valid.tolist()
    while True:
        p = as_support(target_probs(node))
        kids = [c for c in tree.children(node) if valid[c]]
        if not kids:  # accepted leaf: bonus token
            bonus = p.token(int(categorical(p.values, rng)))
            return WalkResult(path, [int(drafted.tokens[i]) for i in path] + [bonus], True, expected)
        drafts = drafted.tokens[kids]
        rule, q = drafted.rules[node], drafted.draft_probs[node]
        verdict = verify_node(p, q, drafts, rule, rng, exact_acceptance)
        expected.append(verdict.acceptance)
        if not verdict.accepted:  # recovered token ends the step
            emitted = [int(drafted.tokens[i]) for i in path] + [verdict.token]
            return WalkResult(path, emitted, False, expected)
        node = kids[drafts.tolist().index(verdict.token)]  # the first child holding the token
        path.append(node)


def chain_walks_fast(rule: NodeRule) -> bool:
    """Whether ``walk_chain`` verifies nodes of this rule: one draft checked by recursive
    rejection sampling (``rrs``, ``rrs_without_replacement``, and the classic rule that
    ``spechub`` and ``optimal`` use for one draft)."""
    return rule.n_eff == 1 and isinstance(rule.verifier, RecursiveRejection)


def walk_chain(
    drafted: DraftedSlots, target_probs: Callable[[int], object], rng: np.random.Generator
) -> WalkResult:
    """``walk`` of a chain (tree widths all 1: node d's child is node d + 1) whose nodes follow a
    rule of ``chain_walks_fast``, in one compiled call per visited node
    (``_walk_numba.rejection_node``) and no per-node records. It draws the same uniforms as
    ``walk`` in the same order and gives the same result (tested): the fast path of the decoding
    loop for chains."""
    tokens = drafted.tokens.tolist()
    node_kernel = _walk_kernels().rejection_node
    path, expected = [], []
    for node in range(-1, len(tokens) - 1):
        p, q = as_support(target_probs(node)), as_support(drafted.draft_probs[node])
        draft, drafts = tokens[node + 1], drafted.tokens[node + 1 : node + 2]
        token = int(node_kernel(*_ids_values(p), *_ids_values(q), p.vocab, drafts, rng.random(2), False))
        expected.append(float(token == draft))
        if token != draft:  # recovered token ends the step
            return WalkResult(path, tokens[: len(path)] + [token], False, expected)
        path.append(node + 1)
    p = as_support(target_probs(len(tokens) - 1))
    bonus = p.token(int(categorical(p.values, rng)))
    return WalkResult(path, tokens + [bonus], True, expected)


def walk_chain_softmax(
    drafted: DraftedSlots,
    target_logits: np.ndarray,
    temperature: float,
    rng: np.random.Generator,
    block: bool = False,
    source: tuple[int, int] | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
) -> WalkResult:
    """``walk_chain`` where p(. | path to node i - 1) is softmax(target_logits[i] / temperature)
    (``SamplingConfig.row_probs`` of a transform without top-k or top-p) and q is
    ``drafted.chain_q``: the whole walk in one compiled call from the logits [k + 1, V]
    (``_walk_numba.softmax_chain_walk``), the same result and generator state as ``walk_chain``
    (tested). With ``block``, ``walk_chain_block``'s (``_walk_numba.softmax_chain_block_walk``,
    tested likewise). With ``top_k`` and / or ``top_p`` < 1 (a chain drafted under them:
    ``drafted.chain_kept``), p the truncated softmax (``_walk_numba.truncated_chain_walk`` and
    ``truncated_chain_block_walk``, tested likewise). The lean
    loop's walk of chains drafted in one call. ``source``: ``mdsd.sampling.uniform_source(rng)``
    where the caller keeps it."""
    tokens = drafted.tokens.tolist()
    q_ids, q_values = drafted.chain_q
    logits = np.ascontiguousarray(target_logits)  # [k + 1, V]
    kernels = _walk_kernels()
    source = uniform_source(rng) if source is None else source
    top_k_arg, top_p_arg = kernel_truncation(top_k, top_p)
    if top_k is not None or top_p_arg < 1.0:
        if drafted.chain_kept is None:
            raise ValueError(
                "top_k, top_p: the chain was not drafted under a truncation (drafted.chain_kept is None)"
            )
        truncated_kernel = kernels.truncated_chain_block_walk if block else kernels.truncated_chain_walk
        kept, token = truncated_kernel(
            logits,
            float(temperature),
            top_k_arg,
            top_p_arg,
            q_ids,
            drafted.chain_kept,
            q_values,
            drafted.tokens,
            *source,
        )
        return chain_walk_result(tokens, kept, token)
    kernel = kernels.softmax_chain_block_walk if block else kernels.softmax_chain_walk
    early = logits.dtype == np.float32  # the early acceptance reads float32 rows
    kept, token = kernel(
        logits,
        float(temperature),
        q_ids,
        q_values,
        drafted.tokens,
        *source,
        early,
    )
    return chain_walk_result(tokens, kept, token)


def walk_tree_softmax(
    tree,
    drafted: DraftedSlots,
    logits: np.ndarray,
    temperature: float,
    top_k: int | None,
    book: RuleBook,
    rng: np.random.Generator,
    source: tuple[int, int] | None = None,
    top_p: float | None = None,
) -> WalkResult:
    """``walk`` of a tree drafted in one call (``drafted.tree_q``) with p the tempered softmax
    after an optional ``top_k`` and ``top_p`` of the target's logits [1 + valid nodes, V] (the
    root's row, then the valid nodes' in ascending order) and the rules of ``book``: in one compiled call
    (``_walk_numba.tree_walk``) where every node is verified by a verifier of ``walk_rule``
    (recursive rejection sampling, greedy, SpecHub, K-SEQ, importance, sample_check) or by the
    optimal verifier (its threshold node, one plan for every node of several drafts; classic
    sampling for one draft); else node by node (``walk``) on the same p. Either way the tokens
    and the generator's state of ``walk`` (tested). ``source``: ``uniform_source(rng)`` where the
    caller keeps it."""
    ids, probs, zeros, kept, counts = drafted.tree_q
    widest = int(np.argmax(counts))  # the plan's node: the first of the most drafts
    n, support = (int(counts[widest]), probs.shape[1] - int(zeros[widest])) if counts[widest] > 1 else (0, 0)
    verifier_args = tree_walk_verifier(book, n, support, probs.shape[1])
    if verifier_args is None:
        return _walk_rows(tree, drafted, logits, temperature, top_k, top_p, rng)
    source = uniform_source(rng) if source is None else source
    path, token, bonus = _walk_kernels().tree_walk(
        logits, float(temperature), *kernel_truncation(top_k, top_p), tree.widths_array, tree.child_starts,
        tree.depths, drafted.tokens, drafted.valid, ids, probs, zeros, kept, counts, *verifier_args, *source,
        logits.dtype == np.float32, *_NO_CACHE,
    )  # fmt: skip
    if token < 0:  # a node of several drafts the plan table does not serve: nothing drawn yet
        return _walk_rows(tree, drafted, logits, temperature, top_k, top_p, rng)
    return tree_walk_result(drafted, path, token, bonus)


# ``tree_walk``'s cache arguments where there is no cache to prefetch (keys, values, base)
_NO_CACHE = (np.zeros((0, 0, 0, 0), dtype=np.float32),) * 2 + (0,)


def tree_walk_result(drafted: DraftedSlots, path: np.ndarray, token: int, bonus: bool) -> WalkResult:
    """The ``WalkResult`` of ``_walk_numba.tree_walk``'s (path [k] of nodes, emitted token, bonus)."""
    path = path.tolist()
    tokens = drafted.tokens[path].tolist()
    expected = [1.0] * len(path) + ([] if bonus else [0.0])
    return WalkResult(path, tokens + [int(token)], bool(bonus), expected)


def tree_walk_verifier(book: RuleBook, n: int, support: int, max_support: int) -> tuple | None:
    """``_walk_numba.tree_walk``'s verifier arguments (rule, optimal, plan_served, plan_races,
    head, tail) for the rules of ``book`` where the first node of several drafts has ``n``
    drafts on a q of ``support`` nonzero entries (n = 0: no such node), of at most
    ``max_support``: the verifiers of ``walk_rule`` (recursive rejection sampling among them),
    or the optimal verifier's threshold kernel for the nodes of at most n drafts on the supports
    ``RuleBook.plan_table`` serves, (n, support) among them; None where ``tree_walk`` cannot
    verify them (another verifier, or a node of another kind of plan)."""
    verifier, plan = book.verifier, _placeholder_plan()
    optimal = isinstance(verifier, OptimalVerifier)
    rule = walk_rule(verifier)
    served, races = _NO_PLAN_TABLE  # no node reads the plan
    if optimal and n > 1:
        table = book.plan_table(n, max_support)
        if table.plan is None or not table.served[n, support]:
            return None
        plan, served, races = table.plan, table.served, table.races
    elif not optimal and rule is None:
        return None
    return (0 if rule is None else rule), optimal, served, races, plan.head, plan.tail


_NO_PLAN_TABLE = (np.zeros((1, 1), dtype=bool), np.zeros((1, 1, 5)))  # ``PlanTable``'s arrays


@functools.cache
def _placeholder_plan() -> NodePlan:
    """A threshold ``NodePlan`` whose head and tail give ``tree_walk`` their types where no
    node uses a plan (``optimal`` False: never read)."""
    return node_plan(get_law("iid"), 2, 8)


def _walk_rows(tree, drafted: DraftedSlots, logits, temperature: float, top_k, top_p, rng) -> WalkResult:
    """``walk`` with p of node i from row 1 + (valid nodes before i) of ``logits`` (the root:
    row 0), transformed as ``SamplingConfig.row_probs`` does (``process_logits_row``)."""
    rows = np.cumsum(drafted.valid)  # node i's row: valid nodes up to i, itself included

    def target_probs(node: int) -> SupportProbs:
        return process_logits_row(logits[0 if node < 0 else rows[node]], temperature, top_k, top_p)

    return walk(tree, drafted, target_probs, rng)


def chain_walk_result(tokens: list[int], kept: int, token) -> WalkResult:
    """The ``WalkResult`` of a chain's walk that kept its first ``kept`` drafts and ended with
    ``token`` (a bonus where every draft was kept)."""
    bonus = kept == len(tokens)
    expected = [1.0] * kept + ([] if bonus else [0.0])
    return WalkResult(list(range(kept)), tokens[:kept] + [int(token)], bonus, expected)


def softmax_token(logits: np.ndarray, temperature: float, u: float) -> int:
    """``mdsd.sampling.draw(tempered_softmax(logits, temperature)[0], u)``: the token of a row of
    logits [V] under the tempered softmax alone at uniform u, in one compiled call
    (``_walk_numba.softmax_draw``; float32 logits seldom need the float64 softmax)."""
    early = logits.dtype == np.float32
    return int(_walk_kernels().softmax_draw(logits, float(temperature), float(u), early))


def walk_chain_block(
    drafted: DraftedSlots, target_probs: Callable[[int], object], rng: np.random.Generator
) -> WalkResult:
    """Block verification (Sun et al., arXiv 2403.10444) of a chain (tree widths all 1): the
    draw of ``mdsd.sequence.chain.block_sample``, which decides from the deepest draft down.
    p is computed for nodes -1..k-2 (their ratios p(x) / q(x) set the weights) and for the last
    node only on a bonus; rows are made dense only where the draw reads them. From the same
    rows and generator it emits what ``mdsd.sequence.chain_verify(..., "block")`` emits (tested):
    the decoding loop's walk for the ``block`` verifier, lean and general loop alike.
    ``expected`` records 1 per kept draft and 0 for the first one left (as ``walk`` does)."""
    tokens = drafted.tokens.tolist()
    k = len(tokens)
    p_rows = {i: as_support(target_probs(i - 1)) for i in range(k)}  # p_i, i = 0..k-1
    q_rows = [as_support(drafted.draft_probs[i - 1]) for i in range(k)]  # q_i
    ratios = [p_rows[i].prob(x) / q_rows[i].prob(x) for i, x in enumerate(tokens)]

    def target_row(i: int) -> np.ndarray:
        if i not in p_rows:  # the last node's p: read for a bonus only
            p_rows[i] = as_support(target_probs(i - 1))
        return p_rows[i].dense()

    kept, y = block_sample(ratios, target_row, lambda i: q_rows[i].dense(), rng)
    bonus = kept == k
    expected = [1.0] * kept + ([] if bonus else [0.0])
    return WalkResult(list(range(kept)), tokens[:kept] + [y], bonus, expected)


DENSE_IDS = np.empty(0, dtype=np.int64)  # ``rejection_node``'s mark of dense values


def _ids_values(probs: SupportProbs) -> tuple[np.ndarray, np.ndarray]:
    return (DENSE_IDS if probs.indices is None else probs.indices), probs.values


@functools.cache
def _walk_kernels():
    """``mdsd.engine._walk_numba``, imported once (numba's import costs ~0.3 s)."""
    from mdsd.engine import _walk_numba

    return _walk_numba


def emission_law(
    tree, drafted: DraftedSlots, target_probs: Callable[[int], np.ndarray], tol: float = 0.0
) -> dict[tuple[int, ...], float]:
    """Exact law of ``walk(...).emitted`` for a fixed drafted tree (enumerates every branch).

    Returns {emitted token tuple: probability}; branches of probability <= tol are dropped.
    """
    out: dict[tuple[int, ...], float] = {}

    def visit(node, prefix, mass):
        p = as_support(target_probs(node)).dense()
        kids = [c for c in tree.children(node) if drafted.valid[c]]
        if not kids:
            for y in np.flatnonzero(p > 0):
                key = prefix + (int(y),)
                out[key] = out.get(key, 0.0) + mass * p[y]
            return
        drafts = drafted.tokens[kids]
        q = as_support(drafted.draft_probs[node]).dense()
        pi = node_output_law(p, q, drafts, drafted.rules[node])
        for y in np.flatnonzero(pi > 0):
            m = mass * pi[y]
            if m <= tol:
                continue
            hits = np.flatnonzero(drafts == y)
            if hits.size == 0:
                key = prefix + (int(y),)
                out[key] = out.get(key, 0.0) + m
            else:
                visit(kids[int(hits[0])], prefix + (int(y),), m)

    visit(-1, (), 1.0)
    return out


def enumerate_children(q: np.ndarray, width: int, book: RuleBook):
    """Every children tuple ``draft_children`` can return, with its probability and the rule."""
    q = as_support(q).dense()
    rule = book.rule(width, support_of(q))
    if rule.n_eff == 1:
        support = np.flatnonzero(q > 0)
        return [(np.array([t]), float(q[t])) for t in support], rule
    tuples, probs = get_law(rule.law).enumerate(q, rule.n_eff)
    return [(t, float(pr)) for t, pr in zip(tuples, probs)], rule
