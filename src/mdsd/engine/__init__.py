"""Multi-draft tree speculative decoding on Hugging Face models (docs/theory.md §7).

Layers, bottom up:

- :mod:`mdsd.engine.tree`: tree shapes built once into a frozen :class:`DraftTree`;
- :mod:`mdsd.engine.walk`: drafting rules and node-by-node verification in numpy, plus
  :func:`emission_law`, the exact law of what a step emits (used by the tests);
- :mod:`mdsd.engine.runner`: 4-D-mask tree forwards and KV-cache surgery on HF models
  (``ModelRunner``); :mod:`mdsd.engine.static_llama`: the lean Llama-family forward;
- :mod:`mdsd.engine.auto`: ``--tree auto`` (calibration, cost model, shape search);
- :mod:`mdsd.engine.records`: :class:`SamplingConfig`, :class:`TreeConfig`, :class:`DecodeStats`,
  :class:`Generation`;
- :mod:`mdsd.engine.decode`: :class:`TreeDecoder` and the :class:`Autoregressive` baseline;
- :mod:`mdsd.engine.bench`: the benchmark behind ``mdsd bench``.

Importing this package imports torch but not transformers.
"""

from mdsd.engine.decode import Autoregressive, TreeDecoder
from mdsd.engine.records import DecodeStats, Generation, SamplingConfig, TreeConfig
from mdsd.engine.tree import DraftTree, build_tree, chain_tree, parse_tree

__all__ = [
    "Autoregressive",
    "DecodeStats",
    "DraftTree",
    "Generation",
    "SamplingConfig",
    "TreeConfig",
    "TreeDecoder",
    "build_tree",
    "chain_tree",
    "parse_tree",
]
