"""Reading (p, q) pairs from files, and random pairs for demos.

Formats: ``.npy`` (one vector or a [2, V] / [..., V] array per file), ``.npz`` (keys ``p``/``q``
or ``target``/``draft``, or one array), ``.json`` (a list, or an object with those keys), and
``.txt``/``.csv`` (whitespace or comma separated numbers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mdsd.logits import probs_from_logits

PAIR_KEYS = (
    ("p", "q"),
    ("target", "draft"),
    ("target_probs", "draft_probs"),
    ("target_logits", "draft_logits"),
)


def _read_any(path: Path):
    """The file's content (array, dict of arrays, or JSON object); errors name the file."""
    if not path.exists():
        raise ValueError(f"input file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"input file {str(path)!r} is a directory")
    try:
        return _parse(path)
    except (ValueError, OSError, EOFError) as err:
        if str(err).startswith(f"input file {str(path)!r}"):
            raise
        raise ValueError(f"input file {str(path)!r}: cannot read it: {err}") from err


def _floats(obj, path: Path) -> np.ndarray:
    """obj as a float64 array; a non-numeric or ragged content names the file."""
    try:
        return np.asarray(obj, dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise ValueError(f"input file {str(path)!r}: not an array of numbers ({err})") from err


def _parse(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if suffix == ".json":
        return json.loads(path.read_text())
    if suffix in (".txt", ".csv"):
        return np.array(path.read_text().replace(",", " ").split(), dtype=np.float64)
    raise ValueError(
        f"input file {str(path)!r}: unsupported format {suffix!r} (use .npy, .npz, .json, .txt or .csv)"
    )


def _split_pair(obj, path: Path):
    if isinstance(obj, dict):
        for a, b in PAIR_KEYS:
            if a in obj and b in obj:
                return _floats(obj[a], path), _floats(obj[b], path)
        if len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise ValueError(
                f"{str(path)!r} holds keys {sorted(obj)}; expected one of "
                f"{[f'{a}/{b}' for a, b in PAIR_KEYS]}"
            )
    arr = _floats(obj, path)
    if arr.ndim >= 2 and arr.shape[0] == 2:
        return arr[0], arr[1]
    raise ValueError(
        f"{str(path)!r} holds one array of shape {arr.shape}; give the draft file too, "
        f"or store both as a [2, V] array"
    )


def read_pair(target_path, draft_path=None, *, logits=False, temperature=1.0, top_k=None, top_p=None):
    """(p, q) as float64 from one file holding both or two files (one each).

    With ``logits=True`` the files hold logits, turned into probabilities by
    :func:`mdsd.probs_from_logits` with the given temperature / top-k / top-p.
    """
    target_path = Path(target_path)
    if draft_path is None:
        p, q = _split_pair(_read_any(target_path), target_path)
    else:
        draft_path = Path(draft_path)
        p = _floats(_single(_read_any(target_path), target_path), target_path)
        q = _floats(_single(_read_any(draft_path), draft_path), draft_path)
    if logits:
        return probs_from_logits(p, q, temperature, top_k, top_p)
    return p, q


def _single(obj, path: Path):
    if isinstance(obj, dict):
        if len(obj) != 1:
            raise ValueError(f"{str(path)!r} holds several arrays {sorted(obj)}; expected one")
        return next(iter(obj.values()))
    return obj


def random_pair(vocab_size: int, seed: int = 0, *, temperature: float = 1.0, top_k=None, top_p=None):
    """A random LM-like (p, q): target logits z ~ N(0, 3^2), draft logits z + N(0, 1.5^2).

    Heavy-headed like real next-token distributions; q is a perturbed copy of p, so the pair has
    realistic overlap. Processed by the same temperature / top-k / top-p.
    """
    if vocab_size < 2:
        raise ValueError(f"--random vocabulary size must be >= 2, got {vocab_size}")
    rng = np.random.default_rng(seed)
    target_logits = 3.0 * rng.standard_normal(vocab_size)
    draft_logits = target_logits + 1.5 * rng.standard_normal(vocab_size)
    return probs_from_logits(target_logits, draft_logits, temperature, top_k, top_p)
