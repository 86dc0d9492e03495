"""Build the two evaluation/training corpora of the bundled model pair, deterministically.

Domains
-------
``code``
    Python source of the interpreter's own standard library (PSF licence), one document per
    ``.py`` file; tests, codec tables and generated files are left out.
``prose``
    The King James Version of the Bible (public domain; Debian package ``bible-kjv-text``,
    read through its ``bible`` program from package ``bible-kjv``), one document per book,
    one verse per line, a ``Book chapter`` heading line per chapter.

Splits are by document (file / book), chosen with a seeded generator, so held-out text is
unseen in training.  Outputs (``data_build/`` is gitignored, nothing here is committed except
the prompts)::

    data_build/corpora/<domain>.<split>.jsonl   {"domain", "source", "text"} per document
    data_build/corpora/manifest.json            sources, licences, sizes, sha256
    src/mdsd/data/prompts/<domain>.jsonl        held-out prompts {"domain", "source", "prompt"}
    src/mdsd/data/prompts/LICENSE-<domain>.txt  licence of the quoted source

Usage::

    apt-get install bible-kjv bible-kjv-text
    python scripts/build_corpora.py [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "data_build" / "corpora"
PROMPT_DIR = REPO / "src" / "mdsd" / "data" / "prompts"

HELDOUT_FRACTION = 0.06  # of characters, per domain
PROMPTS_PER_DOMAIN = 200
PROMPT_MIN_CHARS = 200
PROMPT_MAX_CHARS = 400

# Parts of the standard library that are not hand-written Python code, or are tests.
CODE_EXCLUDED_DIRS = {
    "site-packages",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "pydoc_data",
    "lib-dynload",
    "__pycache__",
    "turtledemo",
}
CODE_EXCLUDED_PREFIXES = ("config-", "_sysconfigdata")

KJV_RANGE = "Ge1:1-Re22:21"
KJV_LICENCE_FILE = Path("/usr/share/doc/bible-kjv-text/copyright")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- documents
def code_documents(stdlib: Path) -> list[dict]:
    """One document per hand-written ``.py`` file of the standard library, sorted by path."""
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in CODE_EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        if any(part.startswith(CODE_EXCLUDED_PREFIXES) for part in rel.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        if text.strip():
            docs.append({"domain": "code", "source": str(rel), "text": text})
    return docs


def prose_documents() -> list[dict]:
    """One document per book of the KJV, read with the Debian ``bible`` program."""
    raw = subprocess.run(["bible", "-l100000", KJV_RANGE], check=True, capture_output=True, text=True).stdout
    heading = re.compile(r"^(\S.*) (\d+)$")
    verse = re.compile(r"^\s*(\d+) (.*)$")
    books: dict[str, list[str]] = {}
    book = None
    for line in raw.splitlines():
        if not line.strip():
            continue
        if m := heading.match(line):
            book = m.group(1)
            books.setdefault(book, [])
            if books[book]:
                books[book].append("")  # blank line between chapters
            books[book].append(line)
        elif m := verse.match(line):
            assert book is not None, line
            books[book].append(m.group(2).strip())
        else:
            raise ValueError(f"unparsed KJV line: {line!r}")
    return [
        {"domain": "prose", "source": name, "text": "\n".join(lines) + "\n"} for name, lines in books.items()
    ]


# ---------------------------------------------------------------- splits and prompts
def split_heldout(docs: list[dict], rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Held-out = documents in a seeded random order until HELDOUT_FRACTION of the characters."""
    total = sum(len(d["text"]) for d in docs)
    order = rng.permutation(len(docs))
    heldout_idx, chars = set(), 0
    for i in order:
        if chars >= HELDOUT_FRACTION * total:
            break
        heldout_idx.add(int(i))
        chars += len(docs[i]["text"])
    train = [d for i, d in enumerate(docs) if i not in heldout_idx]
    heldout = [d for i, d in enumerate(docs) if i in heldout_idx]
    return train, heldout


def sample_prompts(heldout: list[dict], n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` distinct prompts of whole lines, PROMPT_MIN_CHARS..PROMPT_MAX_CHARS long.

    A document is drawn with probability proportional to its length, a start line uniformly
    among its non-blank lines; lines are appended while the prompt stays within the maximum.
    Draws that are too short, or that start on a line already used, are rejected.
    """
    lines = [d["text"].split("\n") for d in heldout]
    weights = np.array([len(d["text"]) for d in heldout], dtype=np.float64)
    weights /= weights.sum()
    prompts, used = [], set()
    for _ in range(200 * n):
        if len(prompts) == n:
            break
        k = int(rng.choice(len(heldout), p=weights))
        start = int(rng.integers(len(lines[k])))
        if not lines[k][start].strip() or (k, start) in used:
            continue
        text = lines[k][start]
        end = start + 1
        while end < len(lines[k]) and len(text) + 1 + len(lines[k][end]) <= PROMPT_MAX_CHARS:
            text += "\n" + lines[k][end]
            end += 1
        text = text.rstrip()
        if not PROMPT_MIN_CHARS <= len(text) <= PROMPT_MAX_CHARS:
            continue
        used.update((k, i) for i in range(start, end))
        prompts.append({"domain": heldout[k]["domain"], "source": heldout[k]["source"], "prompt": text})
    if len(prompts) < n:
        raise RuntimeError(f"only {len(prompts)} of {n} prompts could be drawn")
    return prompts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    args = parser.parse_args(argv)

    stdlib_licence = (args.stdlib / "LICENSE.txt").read_text(encoding="utf-8")
    sources = {
        "code": {
            "description": f"Python {sys.version.split()[0]} standard library source ({args.stdlib})",
            "licence": "PSF License Agreement (Python Software Foundation License Version 2)",
            "licence_file": str(args.stdlib / "LICENSE.txt"),
            "licence_sha256": _sha256(stdlib_licence),
        },
        "prose": {
            "description": "King James Version of the Bible, Debian packages bible-kjv-text and "
            f"bible-kjv (`bible -l100000 {KJV_RANGE}`)",
            "licence": "Public domain (KJV text, translation of 1611); packaging GPL-2+; "
            "data file 'unrestricted use' (Chip Chapin, 1989)",
            "licence_file": str(KJV_LICENCE_FILE),
            "licence_sha256": _sha256(KJV_LICENCE_FILE.read_text(encoding="utf-8")),
        },
    }
    documents = {"code": code_documents(args.stdlib), "prose": prose_documents()}

    manifest = {"seed": args.seed, "heldout_fraction": HELDOUT_FRACTION, "domains": {}}
    for j, (domain, docs) in enumerate(documents.items()):
        # one child generator per domain, so adding a domain leaves the others unchanged
        rng = np.random.default_rng([args.seed, j])
        train, heldout = split_heldout(docs, rng)
        prompts = sample_prompts(heldout, PROMPTS_PER_DOMAIN, rng)
        _write_jsonl(OUT_DIR / f"{domain}.train.jsonl", train)
        _write_jsonl(OUT_DIR / f"{domain}.heldout.jsonl", heldout)
        _write_jsonl(PROMPT_DIR / f"{domain}.jsonl", prompts)
        manifest["domains"][domain] = {
            **sources[domain],
            "train_documents": len(train),
            "train_chars": sum(len(d["text"]) for d in train),
            "heldout_documents": len(heldout),
            "heldout_chars": sum(len(d["text"]) for d in heldout),
            "heldout_sources": sorted(d["source"] for d in heldout),
            "train_sha256": _sha256("".join(d["text"] for d in train)),
            "prompts": len(prompts),
        }
        info = manifest["domains"][domain]
        print(
            f"{domain}: train {info['train_documents']} docs / {info['train_chars']:,} chars, "
            f"held-out {info['heldout_documents']} docs / {info['heldout_chars']:,} chars, "
            f"{len(prompts)} prompts"
        )
    (OUT_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # the prompts quote the sources: ship their licence texts next to them
    for domain, info in sources.items():
        text = Path(info["licence_file"]).read_text(encoding="utf-8")
        (PROMPT_DIR / f"LICENSE-{domain}.txt").write_text(
            f"Licence of the text quoted in {domain}.jsonl: {info['licence']}\n"
            f"Source: {info['description']}\nCopied from {info['licence_file']}:\n\n{text}",
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
