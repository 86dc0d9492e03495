"""mdsd.engine.tree: tree shapes, parents, children, ancestor and level masks, parsing."""

from __future__ import annotations

import numpy as np
import pytest

from mdsd.engine import TreeConfig, build_tree, chain_tree, parse_tree


def test_build_tree_structure():
    t = build_tree((3, 2, 1))
    assert t.num_nodes == 3 + 6 + 6 and t.depth == 3
    assert t.parents[:3].tolist() == [-1, -1, -1]
    assert t.parents[3:9].tolist() == [0, 0, 1, 1, 2, 2]
    assert t.parents[9:].tolist() == list(range(3, 9))
    assert list(t.children(-1)) == [0, 1, 2] and list(t.children(4)) == [10]
    assert list(t.children(12)) == []
    # ancestor mask: node 11 (depth 3) sees the root, nodes 1 and 5 and itself
    assert np.flatnonzero(t.ancestor_mask[12]).tolist() == [0, 2, 6, 12]
    assert t.position_offsets.tolist() == [0] + t.depths.tolist()
    assert t.level_mask(2).shape == (6, 9)
    assert np.flatnonzero(t.level_mask(2)[3]).tolist() == [1, 6]  # node 6: parent 1, itself
    assert chain_tree(3, 4).widths == (3, 1, 1, 1) == parse_tree("3x4").widths
    assert parse_tree("2,2").widths == (2, 2)
    assert TreeConfig.make("2x2", "greedy").verifier == "greedy"
    assert (TreeConfig.make("2x2").law, TreeConfig.make("2x2").verifier) == (
        "without_replacement",
        "rrs_without_replacement",
    )
    assert TreeConfig.make("2x2", "without_replacement", "optimal").describe() == (
        "without_replacement/optimal 2x2"
    )
    for bad in ("", "0,1", "x", "3x0"):
        with pytest.raises(ValueError, match="tree|depth|drafts"):
            parse_tree(bad)


def test_tree_config_from_spec():
    """``TreeConfig.from_spec``, the ``--config`` form of ``mdsd bench`` and the benchmark scripts:
    empty fields take the defaults, the vocabulary and weights fields override the given
    defaults, and other forms are refused naming ``config`` (``draft_weights`` by its name)."""
    config = TreeConfig.from_spec("iid:rrs:1x3:2048")
    assert (config.law, config.verifier, config.tree.widths, config.draft_vocab) == (
        "iid",
        "rrs",
        (1, 1, 1),
        2048,
    )
    assert TreeConfig.from_spec("greedy:greedy:3x4") == TreeConfig.make("3x4", "greedy", "greedy")
    assert TreeConfig.from_spec("::2,2") == TreeConfig.make("2,2")
    assert TreeConfig.from_spec("iid::auto", 512) == TreeConfig.make("auto", "iid", None, 512)
    assert TreeConfig.from_spec("iid:rrs:1x2:", 64).draft_vocab == 64
    assert TreeConfig.from_spec("iid:rrs:1x2:8", 64).draft_vocab == 8
    int8 = TreeConfig.from_spec("iid:rrs:1x3:4096:int8")
    assert (int8.draft_vocab, int8.draft_weights) == (4096, "int8")
    assert int8.describe() == "iid/rrs 1x3 vocab 4096 int8 draft"
    assert TreeConfig.from_spec("iid:rrs:1x3::", 64, "int8") == TreeConfig.make(
        "1x3", "iid", "rrs", 64, "int8"
    )
    assert TreeConfig.from_spec("iid:rrs:1x3").draft_weights == "exact"
    for bad, message in (
        ("iid:rrs", "config must be"),
        ("a:b:c:d:e:f", "config must be"),
        ("iid:rrs:1x2:six", "DRAFT_VOCAB"),
        ("iid:rrs:1x2:64:int4", "DRAFT_WEIGHTS"),
    ):
        with pytest.raises(ValueError, match=message):
            TreeConfig.from_spec(bad)
    with pytest.raises(ValueError, match="draft_weights"):
        TreeConfig.make("1x2", "iid", "rrs", None, "fp8")
    with pytest.raises(ValueError, match="drafts"):  # the tree spec's own check
        TreeConfig.from_spec("iid:rrs:0x2")
