"""mdsd.engine.auto: the tree-choice model and the auto-tree decoder with its cached calibration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder
from mdsd.models import load_pair

from .helpers import PROMPT, TOP_K


def _calibration(rates, draft_s, target_s=(1.0, 1.1, 1.3, 1.6, 2.2, 3.4, 5.8)):
    from mdsd.engine.auto import AcceptanceProfile, Calibration, CostModel

    tokens = (1, 2, 4, 8, 16, 32, 64)
    draft = tuple(draft_s * np.asarray(tokens) ** 0.2)
    head_rows = (0.008, 0.009, 0.010, 0.011, 0.012, 0.013)  # the output layer on 1..6 rows at once
    cost = CostModel(tokens, tuple(target_s), draft, draft[0], 0.01, head_rows, (0.01,) * 4, 0.0, target_s[0])
    return Calibration(AcceptanceProfile(tuple(rates), 100), cost)


def test_auto_tree_model():
    from mdsd.engine.auto import choose_tree, expected_tokens, predict

    rates = (0.6, 0.75, 0.82, 0.86)
    # E = 1 + a + a^2 for a chain of two single drafts; + a_2 * a_1 for widths (2, 1)
    assert expected_tokens((1, 1), rates) == pytest.approx(1 + 0.6 + 0.36)
    assert expected_tokens((2, 1), rates) == pytest.approx(1 + 0.75 + 0.75 * 0.6)
    cheap = choose_tree(_calibration(rates, draft_s=0.02))
    assert cheap.widths and cheap.predicted_speedup > 1.0
    # the choice is the best of every enumerated shape
    for widths in [(1,), (2, 1), (3, 1, 1), (4, 2, 1, 1), (2, 2, 2)]:
        assert predict(widths, _calibration(rates, draft_s=0.02)).tokens_per_s <= cheap.tokens_per_s + 1e-12
    # a draft as slow as the target cannot pay: plain sampling (depth 0)
    assert choose_tree(_calibration(rates, draft_s=1.0)).widths == ()
    assert choose_tree(_calibration((0.01, 0.02, 0.03, 0.04), draft_s=0.02)).widths == ()


def auto_calibration(dec, prompts, cache_dir):
    from mdsd.engine.auto import load_or_calibrate

    return load_or_calibrate(dec, prompts, np.random.default_rng(0), cache_dir)


def test_auto_tree_decoder(llama, tmp_path, monkeypatch):
    import mdsd.engine.auto as auto_module

    sampling = SamplingConfig(1.0, top_k=TOP_K, max_new_tokens=6, stop_on_eos=False)
    config = TreeConfig.make("auto", "without_replacement", "rrs_without_replacement")
    assert config.tree is None and config.describe().endswith(" auto")
    dec = TreeDecoder(llama, config, sampling)
    with pytest.raises(ValueError, match="prompts"):
        dec.choose_tree([], cache_dir=tmp_path)
    choice = dec.choose_tree([PROMPT, [4, 4, 2]], cache_dir=tmp_path)
    assert choice.tokens_per_s >= choice.autoregressive_tokens_per_s
    assert dec.lean_chains()  # chains and trees calibrated on lines of their own
    cost = auto_calibration(dec, [PROMPT, [4, 4, 2]], tmp_path).cost
    assert cost.chain_overhead_s is not None
    assert len(cost.chain_draft_s) == auto_module.MAX_DEPTH and min(cost.chain_draft_s) > 0
    assert (dec.tree is None) == (choice.widths == ())
    out = dec.generate([PROMPT], seed=0)[0]
    assert len(out.token_ids) == 6
    # the calibration is cached: a second decoder loads it instead of measuring again
    import mdsd.engine.auto as auto

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated again instead of loading the cache")

    monkeypatch.setattr(auto, "calibrate", refuse)
    again = TreeDecoder(llama, config, sampling).choose_tree([PROMPT, [4, 4, 2]], cache_dir=tmp_path)
    assert again == choice


def test_per_node_overhead_is_charged_by_tree_size():
    """The fitted loop overhead a + b N adds b per node: a 12-node tree pays 12 b more, a chain
    of one node b; with b large enough, wide trees lose to chains."""
    from dataclasses import replace

    from mdsd.engine.auto import Calibration, choose_tree, predict

    rates = (0.6, 0.75, 0.82, 0.86)
    calibration = _calibration(rates, draft_s=0.02)
    costly = Calibration(calibration.profile, replace(calibration.cost, step_overhead_per_node_s=0.05))
    for widths, nodes in (((1,), 1), ((4, 1, 1), 12), ((2, 2), 6)):
        extra = predict(widths, costly).step_s - predict(widths, calibration).step_s
        assert extra == pytest.approx(0.05 * nodes)
    assert max(choose_tree(costly).widths, default=1) <= max(choose_tree(calibration).widths)


def test_chains_on_the_lean_loop_get_their_own_overhead_line():
    """Where chains run the lean loop, ``CostModel.overhead`` charges chains their own line and
    trees the trees' line; ``calibrate`` fits each from two real shapes of its kind."""
    from dataclasses import replace

    from mdsd.engine.auto import LEAN_OVERHEAD_SHAPES, Calibration, RealSteps, _step_overhead, predict

    calibration = _calibration((0.6, 0.75, 0.82, 0.86), draft_s=0.02)
    lines = replace(
        calibration.cost,
        step_overhead_s=0.1,
        step_overhead_per_node_s=0.03,
        chain_overhead_s=0.02,
        chain_overhead_per_node_s=0.001,
    )
    assert lines.overhead((1, 1, 1)) == pytest.approx(0.02 + 3 * 0.001)
    assert lines.overhead((2, 1)) == pytest.approx(0.1 + 4 * 0.03)
    assert replace(lines, chain_overhead_s=None).overhead((1, 1, 1)) == pytest.approx(0.1 + 3 * 0.03)
    chain = predict((1, 1), Calibration(calibration.profile, lines))
    assert chain.step_s == pytest.approx(predict((1, 1), calibration).step_s + 0.022)
    # each line from its own shapes: chains 1 ms per node, trees 5 ms per node outside the models
    shapes = LEAN_OVERHEAD_SHAPES
    nodes = {w: sum(itertools.accumulate(w, lambda a, b: a * b)) for w in shapes}
    per_node = {w: 0.001 if max(w) == 1 else 0.005 for w in shapes}
    predicted = {w: predict(w, calibration) for w in shapes}
    from mdsd.engine.auto import _mean_verify

    loop = {
        w: per_node[w] * nodes[w] + predicted[w].expected_tokens * _mean_verify(w, calibration.cost)
        for w in shapes
    }
    real = RealSteps({w: predicted[w].step_s + loop[w] for w in shapes}, loop, 1.0)
    chains = _step_overhead(real, calibration, [w for w in shapes if max(w) == 1])
    trees = _step_overhead(real, calibration, [w for w in shapes if max(w) > 1])
    assert chains[1] == pytest.approx(0.001) and trees[1] == pytest.approx(0.005)


def test_chains_on_the_lean_loop_are_drafted_at_the_chain_cost():
    """Where ``chain_draft_s`` is measured, a chain's drafting is the time of drafting the whole
    chain as the lean loop does (not a root plus ``draft_s`` levels); trees keep the levels;
    deeper chains than timed extrapolate the last step; ``ceiling`` makes it free too."""
    from dataclasses import replace

    from mdsd.engine.auto import Calibration, ceiling, predict

    calibration = _calibration((0.6, 0.75, 0.82, 0.86), draft_s=0.3)
    cost = calibration.cost
    chained = Calibration(calibration.profile, replace(cost, chain_draft_s=(0.1, 0.15, 0.2)))
    for depth in (1, 2, 3):
        widths = (1,) * depth
        levels = cost.draft_root_s + sum(cost.draft(1) for _ in range(depth - 1))
        extra = predict(widths, chained).step_s - predict(widths, calibration).step_s
        assert extra == pytest.approx(chained.cost.chain_draft_s[depth - 1] - levels)
    assert chained.cost.chain_draft(5) == pytest.approx(0.3)  # 0.2 + 2 x 0.05
    assert cost.chain_draft(2) is None
    assert predict((2, 1), chained).step_s == predict((2, 1), calibration).step_s

    # cheap chain drafting makes deeper chains win where level-by-level drafting did not
    def best_depth(c):
        return max((1, 2, 3, 4), key=lambda d: predict((1,) * d, c).tokens_per_s)

    assert best_depth(chained) > best_depth(calibration)
    free = ceiling(chained)
    assert free.tokens_per_s == pytest.approx(ceiling(calibration).tokens_per_s)


def test_overhead_slope_comes_from_the_loop_outside_the_models():
    """``_step_overhead``: b is the slope in N of the real steps' time outside the models (less
    their predicted verification), not of the whole steps' residuals, which carry the models'
    spells; a is the mean residual less b N, so the line still meets the real steps on average."""
    from mdsd.engine.auto import RealSteps, _mean_verify, _step_overhead, predict

    calibration = _calibration((0.6, 0.75, 0.82, 0.86), draft_s=0.02)
    shapes, nodes = [(1,), (1, 1), (2, 1)], np.array([1, 2, 4])
    predicted = [predict(w, calibration) for w in shapes]
    verify = np.array(
        [p.expected_tokens * _mean_verify(w, calibration.cost) for w, p in zip(shapes, predicted)]
    )
    spell = np.array([0.0, 0.0, 0.4])  # a slow spell in the whole steps of the 4-node shape only
    loop = 0.05 + 0.002 * nodes + verify  # the loop's own work: 2 ms per node
    seconds = np.array([p.step_s for p in predicted]) + 0.01 + 0.002 * nodes + spell
    real = RealSteps(dict(zip(shapes, seconds)), dict(zip(shapes, loop)), 1.0)
    base, per_node = _step_overhead(real, calibration)
    assert per_node == pytest.approx(0.002)  # the whole steps' slope would be ~0.14 s per node
    assert base == pytest.approx(np.mean(0.01 + spell))
    shrinking = RealSteps(real.seconds, dict(zip(shapes, 0.05 - 0.001 * nodes + verify)), 1.0)
    assert _step_overhead(shrinking, calibration)[1] == 0.0  # b >= 0


def test_ceiling_charges_the_target_alone():
    """``ceiling``: the best shape when drafting, verification and the loop cost nothing. It does
    not move with those costs, is never below the choice, costs a step exactly the target's
    forward and output layer, and is plain sampling when every extra row of the target's forward
    costs a whole forward."""
    from dataclasses import replace

    from mdsd.engine.auto import Calibration, ceiling, choose_tree, expected_tokens

    rates = (0.6, 0.75, 0.82, 0.86)
    cheap, slow = _calibration(rates, draft_s=0.02), _calibration(rates, draft_s=1.0)
    costly = Calibration(slow.profile, replace(slow.cost, step_overhead_s=0.3, step_overhead_per_node_s=0.05))
    best = ceiling(cheap)
    assert ceiling(slow) == ceiling(costly) == best
    assert best.widths and best.tokens_per_s >= choose_tree(cheap).tokens_per_s
    assert choose_tree(slow).widths == ()  # the draft costs too much, the target alone would pay
    e = expected_tokens(best.widths, rates)
    rows = 1 + sum(itertools.accumulate(best.widths, lambda a, b: a * b))
    head = cheap.cost.head_rows_s[rows - 1] + e * (cheap.cost.head_s - cheap.cost.head_rows_s[0])
    assert best.step_s == pytest.approx(cheap.cost.target(rows) + head)
    # a negative intercept corrects items timed apart from the loop: kept, so that the ceiling
    # stays above every prediction
    fast = Calibration(cheap.profile, replace(cheap.cost, step_overhead_s=-0.2))
    assert ceiling(fast).tokens_per_s >= choose_tree(fast).tokens_per_s
    assert ceiling(fast).tokens_per_s > best.tokens_per_s
    # a forward costs as much per row as a one-row forward: no tree can beat plain sampling
    linear = _calibration(rates, draft_s=0.0, target_s=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0))
    assert ceiling(linear).widths == ()


def test_short_generations_keep_plain_sampling():
    """Over a whole generation a tree also pays the draft's prefill (``draft_prefill``): with a
    draft prompt forward of ~5 plain steps, a 4-token generation keeps plain sampling, a long one
    takes the steady-state choice, and without ``new_tokens`` the choice is the steady state's."""
    from dataclasses import replace

    from mdsd.engine.auto import MIN_SPEEDUP, Calibration, choose_tree

    rates = (0.6, 0.75, 0.82, 0.86)
    steady = _calibration(rates, draft_s=0.02)
    body = tuple(0.05 * np.asarray(steady.cost.tokens, dtype=float))  # 0.05 per prompt token
    cost = replace(steady.cost, draft_body_s=body)
    calibration = Calibration(steady.profile, cost)
    assert steady.cost.draft_prefill(100) == 0.0  # not measured: nothing charged
    assert cost.draft_prefill(1) == pytest.approx(cost.draft_s[0])  # one token: a draft root
    assert cost.draft_prefill(100) == pytest.approx(5.0 + cost.draft_s[0] - body[0])
    best = choose_tree(calibration)
    assert best.widths and best == choose_tree(steady)
    assert choose_tree(calibration, prompt_tokens=100, new_tokens=4).widths == ()
    assert choose_tree(calibration, prompt_tokens=100, new_tokens=100_000) == best
    # around the break-even length (~17 tokens here) the choice follows the two totals
    shared, chosen = cost.target(100), set()
    for n in (8, 12, 16, 17, 18, 30, 1000):
        plain_s = shared + n / best.autoregressive_tokens_per_s
        tree_s = shared + cost.draft_prefill(100) + n / best.tokens_per_s
        want = best.widths if plain_s >= MIN_SPEEDUP * tree_s else ()
        assert choose_tree(calibration, prompt_tokens=100, new_tokens=n).widths == want
        chosen.add(want)
    assert chosen == {(), best.widths}


def test_auto_with_block_verification_chooses_a_chain(llama, tmp_path):
    """Block verification checks one draft chain: auto calibrates and chooses among chains."""
    sampling = SamplingConfig(1.0, top_k=TOP_K, max_new_tokens=5, stop_on_eos=False)
    dec = TreeDecoder(llama, TreeConfig.make("auto", "iid", "block"), sampling)
    choice = dec.choose_tree([PROMPT], cache_dir=tmp_path)
    assert all(w == 1 for w in choice.widths)
    assert len(dec.generate([PROMPT], seed=0)[0].token_ids) == 5


def test_calibration_key_names_the_draft_vocabulary(llama):
    from mdsd.engine.auto import calibration_key

    sampling = SamplingConfig(1.0, top_k=TOP_K)
    keys = {
        calibration_key(
            TreeDecoder(llama, TreeConfig.make("auto", "iid", "rrs", draft_vocab=k), sampling), [PROMPT]
        )
        for k in (None, 6, 8)
    }
    assert len(keys) == 3


def test_calibration_key_follows_the_weights(tiny):
    """A model changed under the same path (retrained, or a new release of a bundled model) gets
    another calibration key; the same weights loaded again get the same key."""
    import torch

    from mdsd.engine.auto import calibration_key, weights_digest

    sampling = SamplingConfig(1.0, top_k=TOP_K)
    config = TreeConfig.make("auto", "iid", "rrs")
    first = load_pair(target=tiny["llama"][0], draft=tiny["llama"][1])
    again = load_pair(target=tiny["llama"][0], draft=tiny["llama"][1])
    key = calibration_key(TreeDecoder(first, config, sampling), [PROMPT])
    assert calibration_key(TreeDecoder(again, config, sampling), [PROMPT]) == key
    digest = weights_digest(again.draft)
    with torch.no_grad():
        next(again.draft.parameters()).view(-1)[-1] += 1.0  # one weight changed
    assert weights_digest(again.draft) != digest
    assert calibration_key(TreeDecoder(again, config, sampling), [PROMPT]) != key
