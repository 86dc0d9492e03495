"""Tests of mdsd.models: loading pairs of HF causal LMs and the bundled pair and prompts."""

from __future__ import annotations

import json

import pytest
import torch

from mdsd import models
from mdsd.models import ModelPair, bundled_domains, bundled_prompts, load_pair

from conftest import save_tiny_model

TINY_VOCAB = 64
PROMPT_MIN_CHARS, PROMPT_MAX_CHARS = 200, 400
PROMPTS_PER_DOMAIN = 200


# ---------------------------------------------------------------- tiny random pairs
def _save_tiny(path, vocab_size: int, hidden: int = 16, layers: int = 1, seed: int = 0):
    """A randomly initialised Llama (tied embeddings) and a word-level tokenizer of ``vocab_size``."""
    return save_tiny_model(
        path, vocab=vocab_size, hidden=hidden, layers=layers, seed=seed, tie_embeddings=True
    )


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "target": _save_tiny(root / "target", TINY_VOCAB, hidden=32, layers=2, seed=0),
        "draft": _save_tiny(root / "draft", TINY_VOCAB, hidden=16, layers=1, seed=1),
        "other": _save_tiny(root / "other", TINY_VOCAB + 16, seed=2),
    }


def test_load_local_pair(tiny_dirs):
    pair = load_pair(target=tiny_dirs["target"], draft=str(tiny_dirs["draft"]))
    assert isinstance(pair, ModelPair)
    assert pair.vocab_size == TINY_VOCAB
    assert len(pair.tokenizer) == TINY_VOCAB
    assert pair.target.config.num_hidden_layers == 2
    assert pair.draft.config.num_hidden_layers == 1
    for model in (pair.target, pair.draft):
        assert not model.training
        assert model.dtype == torch.float32
        assert model.device.type == "cpu"
    ids = pair.tokenizer("w5 w7 w9", return_tensors="pt")["input_ids"]  # [1, 3]
    assert ids.tolist() == [[5, 7, 9]]
    with torch.inference_mode():
        logits = pair.target(input_ids=ids).logits  # [1, 3, vocab]
    assert logits.shape == (1, 3, TINY_VOCAB)
    assert str(tiny_dirs["target"]) in pair.name and str(tiny_dirs["draft"]) in pair.name


def test_pair_is_frozen(tiny_dirs):
    pair = load_pair(target=tiny_dirs["target"], draft=tiny_dirs["draft"])
    with pytest.raises(AttributeError):
        pair.name = "x"


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (None, torch.float32),
    ],
)
def test_dtype(tiny_dirs, dtype, expected):
    pair = load_pair(target=tiny_dirs["target"], draft=tiny_dirs["draft"], dtype=dtype)
    assert pair.target.dtype == expected
    assert pair.draft.dtype == expected


def test_bad_arguments_raise(tiny_dirs):
    with pytest.raises(ValueError, match="dtype"):
        load_pair(target=tiny_dirs["target"], draft=tiny_dirs["draft"], dtype="int8")
    with pytest.raises(ValueError, match="device"):
        load_pair(target=tiny_dirs["target"], draft=tiny_dirs["draft"], device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            load_pair(target=tiny_dirs["target"], draft=tiny_dirs["draft"], device="cuda")


def test_auto_device(tiny_dirs):
    pair = load_pair(target=tiny_dirs["target"], draft=tiny_dirs["draft"], device="auto")
    assert pair.target.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_mismatched_vocabularies_raise(tiny_dirs):
    with pytest.raises(ValueError, match=rf"{TINY_VOCAB}.*{TINY_VOCAB + 16}"):
        load_pair(target=tiny_dirs["target"], draft=tiny_dirs["other"])
    with pytest.raises(ValueError, match=rf"{TINY_VOCAB + 16}.*{TINY_VOCAB}"):
        load_pair(target=tiny_dirs["other"], draft=tiny_dirs["draft"])
    # against the bundled pair (vocabulary 8192)
    with pytest.raises(ValueError, match=rf"8192.*{TINY_VOCAB}"):
        load_pair(draft=tiny_dirs["draft"])


def test_mismatched_tokenizers_raise(tiny_dirs, tmp_path):
    # same config.vocab_size, but the draft's tokenizer is larger
    draft = _save_tiny(tmp_path / "draft", TINY_VOCAB + 8)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_dirs["draft"])
    LlamaForCausalLM(config).save_pretrained(draft)
    with pytest.raises(ValueError, match=rf"{TINY_VOCAB}.*{TINY_VOCAB + 8}"):
        load_pair(target=tiny_dirs["target"], draft=draft)


def test_import_is_light():
    # the module itself defines no loaded state: nothing heavy is bound at import time
    assert not any(name in vars(models) for name in ("transformers", "AutoModelForCausalLM"))


# ---------------------------------------------------------------- bundled prompts
def test_bundled_domains():
    assert bundled_domains() == ["code", "prose"]


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_bundled_prompts(domain):
    rows = bundled_prompts(domain)
    assert len(rows) == PROMPTS_PER_DOMAIN
    for row in rows:
        assert set(row) == {"domain", "source", "prompt"}
        assert row["domain"] == domain
        assert row["source"]
        assert PROMPT_MIN_CHARS <= len(row["prompt"]) <= PROMPT_MAX_CHARS
    assert len({row["prompt"] for row in rows}) == len(rows)  # no duplicates


def test_bundled_prompts_all_and_unknown():
    rows = bundled_prompts()
    assert len(rows) == PROMPTS_PER_DOMAIN * len(bundled_domains())
    assert [r["domain"] for r in rows] == sorted(r["domain"] for r in rows)
    with pytest.raises(ValueError, match="available"):
        bundled_prompts("poetry")


def test_prompt_files_are_jsonl():
    with models._package_path("data", "prompts") as directory:
        for path in directory.glob("*.jsonl"):
            for line in path.read_text(encoding="utf-8").splitlines():
                assert isinstance(json.loads(line), dict)


# ---------------------------------------------------------------- bundled pair
@pytest.fixture(scope="module")
def bundled():
    return load_pair()


def test_bundled_pair_shapes(bundled):
    assert bundled.name == models.BUNDLED_NAME
    assert bundled.vocab_size == 8192 == len(bundled.tokenizer)
    assert bundled.target.dtype == torch.float32  # stored as float16, loaded as float32
    assert bundled.target.config.tie_word_embeddings
    assert bundled.target.config.num_hidden_layers > bundled.draft.config.num_hidden_layers
    assert bundled.tokenizer.eos_token is not None and bundled.tokenizer.bos_token is not None
    text = "def f(x):\n    return x + 1\n"
    assert bundled.tokenizer.decode(bundled.tokenizer(text)["input_ids"]) == text


def _mean_loss(model, tokenizer, prompts: list[str]) -> float:
    """Mean next-token cross-entropy over all prompt tokens, one padded batch."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)  # [n, longest]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.inference_mode():
        return model(**batch, labels=labels).loss.item()


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_bundled_target_beats_draft(bundled, domain):
    # deterministic (fixed weights, float32); measured: code 4.241 < 4.380, prose 4.257 < 4.281
    prompts = [row["prompt"] for row in bundled_prompts(domain)[:16]]
    target_loss = _mean_loss(bundled.target, bundled.tokenizer, prompts)
    draft_loss = _mean_loss(bundled.draft, bundled.tokenizer, prompts)
    assert target_loss < draft_loss
    assert target_loss < 5.0  # nats/token; an untrained model sits at log(8192) ~ 9.0


def test_bundled_model_names():
    assert models.BUNDLED_MODELS == ("target", "draft", "draft-distilled")
    assert models.bundled_model("mdsd-bundled/draft-distilled") == "draft-distilled"
    assert models.bundled_model("mdsd-bundled/target") == "target"
    for other in ("mdsd-bundled/tokenizer", "mdsd-bundled/", "mdsd-bundled", "org/draft", "draft", None):
        assert models.bundled_model(other) is None, other
    assert models.resolve_source("mdsd-bundled/draft", "draft") == "mdsd-bundled/draft"  # no hub probe
    with pytest.raises(
        ValueError, match=r"draft='mdsd-bundled/drfat' is not a bundled model.*draft-distilled"
    ):
        models.resolve_source("mdsd-bundled/drfat", "draft")
    named = load_pair(target="mdsd-bundled/target", draft="mdsd-bundled/draft")
    assert named.name == models.BUNDLED_NAME


def _mean_acceptance(pair, prompts: list[str], temperature: float) -> float:
    """Mean over prompt positions of sum_x min(p_x, q_x), p/q = softmax(logits / T) in float64."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = pair.tokenizer(prompt, return_tensors="pt")["input_ids"]  # [1, seq]
            p = torch.softmax(pair.target(input_ids=ids).logits[0].double() / temperature, -1)  # [seq, vocab]
            q = torch.softmax(pair.draft(input_ids=ids).logits[0].double() / temperature, -1)  # [seq, vocab]
            total += torch.minimum(p, q).sum().item()
            count += ids.shape[1]
    return total / count


def test_bundled_distilled_draft(bundled):
    """The distilled draft: same architecture as the draft, other weights, and a higher
    acceptance with the target on held-out prompts (deterministic; measured at T = 0.7:
    code 0.808 > 0.547, prose 0.838 > 0.602)."""
    distilled = load_pair(draft="mdsd-bundled/draft-distilled")
    assert distilled.name == "mdsd-bundled/target|mdsd-bundled/draft-distilled"
    architecture = {
        key: value for key, value in bundled.draft.config.to_dict().items() if key != "_name_or_path"
    }
    assert architecture.items() <= distilled.draft.config.to_dict().items()
    assert distilled.target.state_dict()["lm_head.weight"].equal(
        bundled.target.state_dict()["lm_head.weight"]
    )
    assert not distilled.draft.state_dict()["lm_head.weight"].equal(
        bundled.draft.state_dict()["lm_head.weight"]
    )
    for domain in ("code", "prose"):
        prompts = [row["prompt"] for row in bundled_prompts(domain)[:8]]
        before = _mean_acceptance(bundled, prompts, 0.7)
        after = _mean_acceptance(distilled, prompts, 0.7)
        assert after > before + 0.05, (domain, before, after)


def test_bundled_forward_with_cache(bundled):
    import inspect

    # transformers 5.x names the KV cache ``cache``; 4.x named it ``past_key_values``
    key = "cache" if "cache" in inspect.signature(bundled.target.forward).parameters else ("past_key_values")
    ids = bundled.tokenizer("import os\n", return_tensors="pt")["input_ids"]  # [1, seq]
    with torch.inference_mode():
        full = bundled.target(input_ids=ids).logits[:, -1]  # [1, vocab]
        prefix = bundled.target(input_ids=ids[:, :-1], use_cache=True)
        step = bundled.target(input_ids=ids[:, -1:], use_cache=True, **{key: prefix[key]}).logits[
            :, -1
        ]  # [1, vocab]
    torch.testing.assert_close(full, step, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- hub ids without network
@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty local hub cache and a hub that must not be asked (any request fails the test)."""
    from huggingface_hub import HfApi, constants

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was queried")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(HfApi, "model_info", no_network)
    return tmp_path / "hub"


def _cache_as_hub(hub, repo: str, source) -> None:
    """Lay out ``source``'s files as the hub cache's snapshot of ``repo`` at main."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(source, folder / "snapshots" / commit)


def test_uncached_hub_id_offline_fails_at_once(empty_hub, monkeypatch):
    """HF_HUB_OFFLINE and no cached copy: a ValueError naming the argument, no hub request."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ValueError,
        match=r"^target='some-org/some-model' is not a local directory and not in the local hub cache",
    ):
        load_pair(target="some-org/some-model")
    with pytest.raises(ValueError, match=r"^draft=.*HF_HUB_OFFLINE is set"):
        models.resolve_source("some-org/other-model", "draft")


def test_uncached_hub_id_unreachable_or_unknown(empty_hub, monkeypatch):
    """Online mode: one metadata request decides; an unreachable hub or an unknown repository is
    refused with the reason, a reachable repository is handed to transformers as the id."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []

    def unreachable(self, repo_id, timeout=None, **kwargs):
        asked.append(timeout)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    with pytest.raises(ValueError, match=r"^target=.*cannot be reached \(\[Errno -2\] Name or service"):
        models.resolve_source("some-org/some-model", "target")
    assert asked == [models.HUB_PROBE_TIMEOUT]

    class Missing(RepositoryNotFoundError):  # what model_info raises on a 404 (no HTTP response here)
        def __init__(self):
            Exception.__init__(self, "404 Client Error: Repository Not Found")

    def unknown(self, repo_id, timeout=None, **kwargs):
        raise Missing()

    monkeypatch.setattr(HfApi, "model_info", unknown)
    with pytest.raises(ValueError, match=r"^draft=.*the hub has no such model"):
        models.resolve_source("some-org/some-model", "draft")
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, timeout=None, **kwargs: None)
    assert models.resolve_source("some-org/some-model", "target") == "some-org/some-model"


def test_cached_hub_ids_load_without_network(tiny_dirs, empty_hub, monkeypatch):
    """Hub ids present in the local hub cache load from their snapshots (offline or not), with
    the same weights as the directories they were copied from."""
    from huggingface_hub import constants

    _cache_as_hub(empty_hub, "org/tiny-target", tiny_dirs["target"])
    _cache_as_hub(empty_hub, "org/tiny-draft", tiny_dirs["draft"])
    for offline in (True, False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        pair = load_pair(target="org/tiny-target", draft="org/tiny-draft")
        assert pair.name == "org/tiny-target|org/tiny-draft"
        local = load_pair(target=tiny_dirs["target"], draft=tiny_dirs["draft"])
        for model, reference in ((pair.target, local.target), (pair.draft, local.draft)):
            for (name, value), (_, expected) in zip(
                model.state_dict().items(), reference.state_dict().items()
            ):
                assert torch.equal(value, expected), name
    assert models.resolve_source(tiny_dirs["target"], "target") == tiny_dirs["target"]
    with pytest.raises(ValueError, match=r"^target=.* is a file"):
        models.resolve_source(tiny_dirs["target"] / "config.json", "target")
