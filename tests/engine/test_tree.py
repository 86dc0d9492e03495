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
