"""``mdsd generate`` and ``mdsd bench``: runs on a tiny random Llama pair, JSON output, notes, and
refusals (exit code 2, one line)."""

from __future__ import annotations

import json

import pytest

from .helpers import assert_refused, mdsd, run
from conftest import save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """A random tiny Llama pair (vocabulary 12, every matrix x6), as the engine tests use."""
    root = tmp_path_factory.mktemp("cli_decode")
    common = {"vocab": 12, "max_positions": 48, "weight_scale": 6.0}
    target = save_tiny_model(root / "llama_t", hidden=32, layers=2, seed=0, **common)
    draft = save_tiny_model(root / "llama_d", hidden=16, layers=1, seed=1, **common)
    return str(target), str(draft)


def test_bench_prompts_file_and_flags(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"nope": 1}\n')
    assert_refused(mdsd("bench", "--prompts-file", str(tmp_path / "bad.jsonl")), "bad.jsonl", "line 2")
    for command in (("bench", "--no-hf"), ("generate", "hello")):  # SamplingConfig's check, named as the flag
        assert_refused(mdsd(*command, "-m", "0"), "--max-new-tokens must be a positive integer, got 0")
    missing = run("bench", "--prompts-file", str(tmp_path / "none.txt"))
    assert missing.exit_code == 2 and "none.txt" in missing.output and "does not exist" in missing.output
    help_text = run("bench", "--help").output
    for flag in ("--ignore-eos", "--stop-at-eos", "--no-hf", "--json"):
        line = next(line for line in help_text.splitlines() if flag in line)
        assert "<bool>" not in line, line
    assert "--prompts-file" in help_text and "--repeats" in help_text
    assert_refused(mdsd("bench", "--repeats", "0"), "--repeats")


def test_bench_progress_lines_when_piped(tmp_path):
    """Piped (no terminal): plain progress lines on stderr and no library deprecation notice
    among them (HF assisted generation logs one per call), the table on stdout; a plain-text
    prompts file works."""
    (tmp_path / "prompts.txt").write_text("def add(a, b):\n")
    result = mdsd(
        "bench",
        "--prompts-file",
        str(tmp_path / "prompts.txt"),
        "-m",
        "3",
        "-c",
        "iid:rrs:2x2",
        "--stop-at-eos",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all("/3 " in line for line in lines), result.stderr
    assert "autoregressive" in lines[0] and "hf_assisted" in lines[1]
    assert "1 prompts" in result.stdout and "mdsd iid/rrs 2x2" in result.stdout
    assert "decoding only" in result.stdout and "The prompts' forwards (prefill" in result.stdout


def test_cli_generate_and_bench(tiny):
    """generate --json on a tiny pair; a verifier that is not exact for the law is refused."""
    models = ["--target", tiny[0], "--draft", tiny[1]]
    res = run(
        "generate", "w3 w4", *models, "--threads", "1", "--tree", "2,1", "--law", "without_replacement",
        "-m", "5", "--ignore-eos", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index('{"prompt"') :].splitlines()[0])
    assert len(out["token_ids"]) == 5 and out["metrics"]["steps"] >= 1
    res = run("generate", "w3", *models, "--verifier", "rrs", "--law", "without_replacement")
    assert res.exit_code == 2 and "exact only" in res.output


def test_cli_generate_notes_full_vocabulary_optimal(tiny):
    """optimal with priority orders (>= 3 drafts without replacement) and no top-k: a note
    suggests --top-k; with a top-k, or with two drafts (closed form), no note."""
    base = [
        "generate", "w3", "--target", tiny[0], "--draft", tiny[1], "--threads", "1",
        "--law", "without_replacement", "--verifier", "optimal", "-m", "2", "--ignore-eos",
    ]  # fmt: skip
    for extra, noted in (
        (["--tree", "3,1"], True),
        (["--tree", "3,1", "--top-k", "8"], False),
        (["--tree", "2,1"], False),
    ):
        res = run(*base, *extra)
        assert res.exit_code == 0, res.output
        assert ("--top-k 50" in res.output) == noted, (extra, res.output)


def test_generate_streams_text_and_reports_the_tree():
    """The bundled pair, three tokens: text on stdout, one metrics line naming the tree."""
    res = run("generate", "Once", "--max-new-tokens", "3", "--tree", "1x2", "--law", "iid", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("Once")
    assert "[iid/rrs 1x2] 3 tokens" in res.output and "tokens/step" in res.output


def test_generate_with_the_distilled_draft():
    """--draft names a bundled model: the distilled draft decodes with the bundled target."""
    res = run(
        "generate",
        "Once",
        "-m",
        "3",
        "--tree",
        "1x2",
        "--draft",
        "mdsd-bundled/draft-distilled",
        "--threads",
        "1",
    )
    assert res.exit_code == 0, res.output
    assert res.output.startswith("Once") and "3 tokens" in res.output


def test_draft_vocab_option(tiny):
    """--draft-vocab K and the config's fourth field: decoding works, named in the bench table;
    bad sizes exit with code 2 and one line naming the option."""
    models = ["--target", tiny[0], "--draft", tiny[1], "--threads", "1"]
    res = run(
        "generate",
        "w3 w4",
        *models,
        "--tree",
        "1x2",
        "--draft-vocab",
        "6",
        "-m",
        "4",
        "--ignore-eos",
        "--json",
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index('{"prompt"') :].splitlines()[0])
    assert len(out["token_ids"]) == 4
    res = run("bench", *models, "--prompts", "1", "-m", "3", "--no-hf", "-c", "iid:rrs:1x2:6", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output[res.output.index("{") :])["rows"]
    assert rows[-1]["method"] == "mdsd iid/rrs 1x2 vocab 6"
    assert_refused(mdsd("generate", "w3", *models, "--draft-vocab", "0"), "draft_vocab")
    assert_refused(mdsd("generate", "w3", *models, "--draft-vocab", "13"), "draft_vocab")
    assert_refused(mdsd("bench", *models, "--no-hf", "-c", "iid:rrs:1x2:six"), "DRAFT_VOCAB")


def test_draft_weights_option(tiny):
    """--draft-weights int8 and the config's fifth field: decoding works on the int8 draft, named
    in the bench table; an unknown value, or int8 off the compiled forward, exits with code 2 and
    one line naming the option."""
    models = ["--target", tiny[0], "--draft", tiny[1], "--threads", "1"]
    args = ("generate", "w3 w4", *models, "--tree", "1x2", "-m", "4", "--ignore-eos", "--json")
    res = run(*args, "--draft-weights", "int8")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index('{"prompt"') :].splitlines()[0])
    assert len(out["token_ids"]) == 4
    bench = ("bench", *models, "--prompts", "1", "-m", "3", "--no-hf", "--json")
    res = run(*bench, "-c", "iid:rrs:1x2:6:int8", "-c", "iid:rrs:1x2")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output[res.output.index("{") :])["rows"]
    assert [r["method"] for r in rows[-2:]] == ["mdsd iid/rrs 1x2 vocab 6 int8 draft", "mdsd iid/rrs 1x2"]
    res = run(*bench, "-c", "iid:rrs:1x2", "--draft-weights", "int8")
    assert res.exit_code == 0, res.output
    assert (
        json.loads(res.output[res.output.index("{") :])["rows"][-1]["method"] == "mdsd iid/rrs 1x2 int8 draft"
    )
    assert_refused(mdsd("generate", "w3", *models, "--draft-weights", "int4"), "draft_weights")
    assert_refused(
        mdsd("generate", "w3", *models, "--draft-weights", "int8", "--matmul", "torch"), "draft_weights"
    )
    assert_refused(mdsd("bench", *models, "--no-hf", "-c", "iid:rrs:1x2:6:fp8"), "DRAFT_WEIGHTS")
