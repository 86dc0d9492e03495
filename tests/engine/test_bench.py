"""mdsd.engine.bench: the benchmark rows (autoregressive, HF assisted, tree methods, auto tree)."""

from __future__ import annotations

import pytest

from mdsd.engine import SamplingConfig, TreeConfig

from .helpers import PROMPT, TOP_K


def test_bench_rows(llama):
    from mdsd.engine.bench import prefill_note, run_bench

    sampling = SamplingConfig(0.7, max_new_tokens=6, stop_on_eos=False)
    configs = [TreeConfig.make("1x2", "iid", "rrs"), TreeConfig.make("2x2", "greedy", "greedy")]
    rows = run_bench(llama, [PROMPT, [5, 6]], sampling, configs, seed=0)
    assert [r["method"] for r in rows][:2] == ["autoregressive", "hf_assisted"]
    for r in rows:
        assert r["new_tokens"] == 12 and r["target_calls"] >= 1
        assert r["speedup_vs_autoregressive"] > 0
    assert rows[0]["target_calls"] == 12  # one target call per autoregressive token
    for r in rows[2:]:  # the per-step profile of tree methods, in autoregressive steps
        for key in ("draft_level_ar_steps", "target_forward_ar_steps", "overhead_ar_steps"):
            assert r[key] > 0
    # the prompts' forwards: timed within the target's time, left out of the decoding-only speedup
    base = rows[0]
    assert 0 < base["prefill_time_s"] < base["target_time_s"]
    assert base["prefill_share"] == base["prefill_time_s"] / base["total_time_s"]
    assert f"took {100 * base['prefill_share']:.1f}% of plain sampling's time" in prefill_note(rows)
    assert prefill_note(rows[1:]) is None  # no autoregressive row
    assert "decode_speedup_vs_autoregressive" not in rows[1]  # HF assisted: prefill not timed
    for r in [base] + rows[2:]:
        assert 0 < r["prefill_time_s"] < r["target_time_s"]
        decode = (base["total_time_s"] - base["prefill_time_s"]) / (r["total_time_s"] - r["prefill_time_s"])
        assert r["decode_speedup_vs_autoregressive"] == pytest.approx(decode, rel=1e-12)  # same tokens


def test_bench_auto_tree(llama, monkeypatch, tmp_path):
    from mdsd.engine.bench import auto_note, run_bench

    monkeypatch.setenv("MDSD_CACHE_DIR", str(tmp_path))
    sampling = SamplingConfig(0.7, top_k=TOP_K, max_new_tokens=6, stop_on_eos=False)
    configs = [TreeConfig.make("auto", "without_replacement", "rrs_without_replacement")]
    rows = run_bench(llama, [PROMPT, [5, 6]], sampling, configs, seed=0, hf=False)
    auto_row = rows[-1]
    assert auto_row["method"].startswith("mdsd without_replacement/rrs_without_replacement auto (")
    assert auto_row["new_tokens"] == 12 and auto_row["predicted_tokens_per_second"] > 0
    assert auto_row["chosen_tree"] in auto_row["method"]
    assert auto_row["ceiling_speedup_vs_autoregressive"] >= 1.0 and auto_row["ceiling_tree"]
    assert list(tmp_path.glob("auto-tree/*.json"))  # the calibration was cached
    # the prediction (the decoding phase's steady state) is set against the decoding phase
    seconds = (auto_row["total_time_s"] - auto_row["prefill_time_s"]) / auto_row["new_tokens"]
    assert auto_row["decode_tokens_per_second"] == pytest.approx(1.0 / seconds)
    note = auto_note(auto_row)
    assert f"measured {auto_row['decode_tokens_per_second']:.1f} tokens/s" in note
    assert f"{auto_row['speedup_vs_autoregressive']:.2f}x overall" in note


def test_default_grid_adds_quarter_vocabulary_drafts():
    """``mdsd bench``'s default grid: the full-vocabulary trees, then a 1x2 chain and the auto tree
    with the draft over V // 4 tokens; with --draft-vocab K, the grid alone with K everywhere."""
    from mdsd.engine.bench import DEFAULT_CONFIGS, default_configs

    grid = default_configs(8192)
    assert [c.draft_vocab for c in grid] == [None] * len(DEFAULT_CONFIGS) + [2048, 2048]
    assert grid[-2].describe() == "iid/rrs 1x2 vocab 2048" and grid[-1].tree is None
    assert [c.draft_vocab for c in default_configs(8192, 1024)] == [1024] * len(DEFAULT_CONFIGS)
    assert len(default_configs(4)) == len(DEFAULT_CONFIGS)  # too small a vocabulary to cut


def test_bench_repeats_keep_the_fastest_run(llama, monkeypatch):
    """repeats R: every method decodes every prompt R times, interleaved, and keeps the fastest
    run's statistics (the same tokens and target calls as a single run: decoding is a function of
    the seed); R < 1 is refused, naming ``repeats``."""
    import pytest

    from mdsd.engine import bench

    sampling = SamplingConfig(0.7, max_new_tokens=5, stop_on_eos=False)
    configs = [TreeConfig.make("1x2", "iid", "rrs")]
    once = bench.run_bench(llama, [PROMPT, [5, 6]], sampling, configs, seed=0, hf=False)
    times = iter([3.0, 1.0, 2.0, 5.0, 4.0, 6.0] * 4)  # per (prompt, repeat, method): a fake clock
    real_run = bench._DecoderMethod.run

    def fake_time(self, prompt, seed, i):
        stats = real_run(self, prompt, seed, i)
        stats.total_time = next(times)
        return stats

    monkeypatch.setattr(bench._DecoderMethod, "run", fake_time)
    rows = bench.run_bench(llama, [PROMPT, [5, 6]], sampling, configs, seed=0, hf=False, repeats=3)
    for got, want in zip(rows, once):
        for key in ("new_tokens", "target_calls", "steps", "step_tokens", "accepted"):
            assert got.get(key) == want.get(key), key
    # prompt 1: AR runs 3, 2, 4 (fastest 2), tree 1, 5, 6 (1); prompt 2: AR 3, 2, 4, tree 1, 5, 6
    assert rows[0]["total_time_s"] == pytest.approx(4.0) and rows[1]["total_time_s"] == pytest.approx(2.0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="repeats"):
            bench.run_bench(llama, [PROMPT], sampling, configs, hf=False, repeats=bad)


def test_bench_level_by_level_rows(llama):
    """``level_by_level``: a chain on the lean loop and a tree of a law drafted in one call each
    get a second row drafted level by level (``compiled_draft`` False), with the same tokens; a
    tree of another law gets none."""
    from mdsd.engine.bench import run_bench

    sampling = SamplingConfig(0.7, max_new_tokens=6, stop_on_eos=False)
    configs = [
        TreeConfig.make("1x2", "iid", "rrs"),
        TreeConfig.make("2x2", "iid", "rrs"),
        TreeConfig.make("2x2", "greedy", "greedy"),
        TreeConfig.make("2x2", "conditional_poisson", "sample_check"),
    ]
    rows = run_bench(llama, [PROMPT, [5, 6]], sampling, configs, seed=0, hf=False, level_by_level=True)
    assert [r["method"] for r in rows] == [
        "autoregressive",
        "mdsd iid/rrs 1x2",
        "mdsd iid/rrs 1x2 (drafted level by level)",
        "mdsd iid/rrs 2x2",
        "mdsd iid/rrs 2x2 (drafted level by level)",
        "mdsd greedy/greedy 2x2",
        "mdsd greedy/greedy 2x2 (drafted level by level)",
        "mdsd conditional_poisson/sample_check 2x2",
    ]
    for one_call, levels in ((1, 2), (3, 4), (5, 6)):
        for key in ("new_tokens", "target_calls", "draft_calls", "mean_accepted", "acceptance_by_depth"):
            assert rows[one_call][key] == rows[levels][key], key


def test_bench_general_loop_rows(llama):
    """``general_loop``: a chain on the lean loop gets a second row on the general loop, with the
    same tokens; trees (always the general loop) get none."""
    from mdsd.engine.bench import run_bench

    sampling = SamplingConfig(0.7, max_new_tokens=6, stop_on_eos=False)
    configs = [TreeConfig.make("1x2", "iid", "rrs"), TreeConfig.make("2x2", "iid", "rrs")]
    rows = run_bench(llama, [PROMPT, [5, 6]], sampling, configs, seed=0, hf=False, general_loop=True)
    names = [r["method"] for r in rows]
    assert names == [
        "autoregressive",
        "mdsd iid/rrs 1x2",
        "mdsd iid/rrs 1x2 (general loop)",
        "mdsd iid/rrs 2x2",
    ]
    lean, general = rows[1], rows[2]
    for key in ("new_tokens", "target_calls", "draft_calls", "mean_accepted", "acceptance_by_depth"):
        assert lean[key] == general[key], key
