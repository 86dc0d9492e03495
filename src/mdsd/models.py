"""Target/draft model pairs: the bundled offline pair, or any two Hugging Face causal LMs.

The bundled pair (``src/mdsd/data/models``) is a byte-level BPE tokenizer (vocabulary 8,192)
shared by two ``LlamaForCausalLM`` models trained on this project's corpora (Python standard
library source and the King James Bible; see ``MODEL_CARD.md``):

* target: 6 layers, hidden 384, about 13.8 M parameters;
* draft: 1 layer, hidden 256, about 2.9 M parameters;
* draft-distilled: the draft fine-tuned to the target's next-token distributions, a drop-in
  draft with higher acceptance (``load_pair(draft="mdsd-bundled/draft-distilled")``).

``load_pair()`` loads target and draft. Any of the three is named ``mdsd-bundled/<model>`` where a
``target`` or ``draft`` argument (or ``--target``/``--draft`` option) is expected.

Weights are stored as float16 and loaded as float32 on the CPU unless ``dtype`` says otherwise.

>>> pair = load_pair()                                    # doctest: +SKIP
>>> pair.target.config.vocab_size == pair.draft.config.vocab_size   # doctest: +SKIP
True

The held-out evaluation prompts (about 200 per domain, never seen in training) are read with
:func:`bundled_prompts`; :func:`bundled_domains` lists the domains.

This module does no I/O and imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BUNDLED_MODELS",
    "BUNDLED_NAME",
    "ModelPair",
    "bundled_domains",
    "bundled_model",
    "bundled_prompts",
    "load_pair",
    "resolve_source",
]

BUNDLED_NAME = "mdsd-bundled"
BUNDLED_MODELS = ("target", "draft", "draft-distilled")  # directories of src/mdsd/data/models
_DATA_PACKAGE = "mdsd"
_MODELS_DIR = ("data", "models")
_PROMPTS_DIR = ("data", "prompts")

# Accepted spellings of ``dtype``; values are attribute names on ``torch``.
_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


@dataclass(frozen=True)
class ModelPair:
    """A target model, a draft model and the tokenizer they share.

    Attributes:
        target: the large causal LM whose distribution speculative decoding must reproduce.
        draft: the small causal LM proposing tokens; same vocabulary as ``target``.
        tokenizer: the tokenizer of ``target`` (checked to have the draft's vocabulary size).
        name: ``"mdsd-bundled"`` for the bundled pair, else ``"<target>|<draft>"``.
    """

    target: PreTrainedModel
    draft: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def vocab_size(self) -> int:
        """Size of the shared output vocabulary (``config.vocab_size``)."""
        return int(self.target.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def dtype(self) -> torch.dtype:
        return self.target.dtype


# ---------------------------------------------------------------- argument parsing
def _resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device``, or ``"auto"`` (cuda if present)."""
    import torch

    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a string or torch.device, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a valid torch device") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default: float32 on CPU; bfloat16 on CUDA where supported, else float16."""
    import torch

    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} is not a floating-point dtype")
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return getattr(torch, _DTYPE_NAMES[dtype.removeprefix("torch.")])
    raise ValueError(
        f"dtype={dtype!r} not understood; use one of {sorted(set(_DTYPE_NAMES.values()))} or a torch.dtype"
    )


# ---------------------------------------------------------------- package data
@contextmanager
def _package_path(*parts: str) -> Iterator[Path]:
    """A real filesystem path for package data (extracted if the package is zipped)."""
    with resources.as_file(resources.files(_DATA_PACKAGE).joinpath(*parts)) as path:
        yield Path(path)


def bundled_domains() -> list[str]:
    """Domains of the bundled held-out prompts, sorted (``["code", "prose"]``)."""
    with _package_path(*_PROMPTS_DIR) as directory:
        return sorted(p.stem for p in directory.glob("*.jsonl"))


def bundled_prompts(domain: str | None = None) -> list[dict[str, str]]:
    """Held-out evaluation prompts shipped with the package.

    Args:
        domain: one of :func:`bundled_domains`; ``None`` returns all domains, in sorted order.

    Returns:
        Dicts ``{"domain": ..., "source": <file or book>, "prompt": <200-400 characters>}``,
        in file order. The sources are documents held out of the training corpora.
    """
    domains = bundled_domains()
    if domain is not None and domain not in domains:
        raise ValueError(f"domain={domain!r} is not bundled; available: {domains}")
    rows: list[dict[str, str]] = []
    with _package_path(*_PROMPTS_DIR) as directory:
        for name in domains if domain is None else [domain]:
            with (directory / f"{name}.jsonl").open(encoding="utf-8") as f:
                rows.extend(json.loads(line) for line in f if line.strip())
    return rows


# ---------------------------------------------------------------- loading
HUB_PROBE_TIMEOUT = 5.0  # seconds: one metadata request deciding whether a hub id can be fetched


def bundled_model(source: str | Path) -> str | None:
    """The bundled model that ``source`` names (``"mdsd-bundled/draft-distilled"`` ->
    ``"draft-distilled"``; one of :data:`BUNDLED_MODELS`), or ``None`` for any other source."""
    prefix = BUNDLED_NAME + "/"
    name = str(source)
    if name.startswith(prefix) and name[len(prefix) :] in BUNDLED_MODELS:
        return name[len(prefix) :]
    return None


def resolve_source(source: str | Path, argument: str) -> str | Path:
    """Where a model named by ``argument`` (``target`` / ``draft``) is read from, without waiting
    on the network when it cannot be fetched.

    0. a bundled model's name (:func:`bundled_model`): itself (package data, read by
       :func:`load_pair`);
    1. an existing directory: itself (a file is refused);
    2. a hub id (``org/name``) in the local hub cache: its snapshot directory
       (``snapshot_download(local_files_only=True)``; no network, the cached revision of main);
    3. a hub id not cached: refused at once under ``HF_HUB_OFFLINE=1``; else one metadata request
       (``HfApi.model_info``, ``HUB_PROBE_TIMEOUT`` s) decides: a reachable, existing repository
       is returned as is (transformers downloads it), an unreachable hub or an unknown repository
       is refused.

    Raises ValueError with a one-line message naming ``argument``.
    """
    if bundled_model(source) is not None:
        return source
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if str(source).startswith(BUNDLED_NAME + "/"):
        names = ", ".join(f"{BUNDLED_NAME}/{model}" for model in BUNDLED_MODELS)
        raise ValueError(f"{argument}={str(source)!r} is not a bundled model; the bundled ones are {names}")
    if path.exists():
        raise ValueError(f"{argument}={str(source)!r} is a file; give a model directory or a hub id")
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo = str(source)
    cache = constants.HF_HUB_CACHE
    where = f"{argument}={repo!r} is not a local directory and not in the local hub cache ({cache})"
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except HFValidationError:
        raise ValueError(f"{argument}: directory {repo!r} does not exist (and it is not a hub id)") from None
    except (LocalEntryNotFoundError, OSError):
        pass
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{where}; HF_HUB_OFFLINE is set, so it cannot be downloaded")
    try:
        HfApi().model_info(repo, timeout=HUB_PROBE_TIMEOUT)
    except RepositoryNotFoundError:
        raise ValueError(f"{where}, and the hub has no such model (or it is private: log in)") from None
    except Exception as err:  # no network, proxy, timeout, server error: not loadable now
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{where}, and the hub cannot be reached ({reason})") from None
    return repo


def _load_model(source: str | Path, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # No per-model "Loading weights" bar on stderr (it interleaves with our own progress and
    # streamed text); the caller's setting is restored afterwards.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def _try_load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer stored with a model, or ``None`` when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError):
        return None


def _check_vocabularies(target_size: int, draft_size: int, what: str = "config.vocab_size") -> None:
    """Raise ValueError, naming both sizes, unless target and draft vocabularies agree."""
    if target_size != draft_size:
        raise ValueError(
            f"target and draft vocabularies differ: target {what}={target_size}, draft {what}={draft_size}"
        )


def load_pair(
    target: str | Path | None = None,
    draft: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> ModelPair:
    """Load a target/draft pair of causal LMs, in eval mode, on one device and dtype.

    Args:
        target: local directory or hub id of the target model (``AutoModelForCausalLM``),
            or a bundled model's name (``"mdsd-bundled/target"``, :data:`BUNDLED_MODELS`);
            ``None`` loads the bundled target. The tokenizer is loaded from the same place
            (the bundled tokenizer for the bundled models).
        draft: local directory, hub id or bundled model's name of the draft model; ``None``
            loads the bundled draft, ``"mdsd-bundled/draft-distilled"`` the bundled draft
            distilled from the bundled target (MODEL_CARD.md).
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``; ``None`` means
            float32 on CPU and bfloat16 (float16 where unsupported) on CUDA.

    Returns:
        A :class:`ModelPair`.

    Raises:
        ValueError: on a bad ``device``/``dtype``, or when the two models' vocabularies
            (``config.vocab_size``, or the tokenizers' lengths) differ; the message names both
            sizes.

    The bundled pair is read from package data; it needs neither network nor hub cache. A hub id
    is read from the local hub cache when it is there, and refused at once (ValueError naming the
    argument) when it is neither cached nor reachable (:func:`resolve_source`).
    """
    from transformers import AutoConfig

    torch_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, torch_device)
    # 0. where each model is read from: fails at once for a hub id neither cached nor reachable
    target_bundled = "target" if target is None else bundled_model(target)
    draft_bundled = "draft" if draft is None else bundled_model(draft)
    target_dir = None if target_bundled else resolve_source(target, "target")
    draft_dir = None if draft_bundled else resolve_source(draft, "draft")
    with _package_path(*_MODELS_DIR) as bundled_dir:
        target_src = bundled_dir / target_bundled if target_bundled else target_dir
        draft_src = bundled_dir / draft_bundled if draft_bundled else draft_dir
        # 1. vocabularies, from the configs, before any weights are read
        _check_vocabularies(
            AutoConfig.from_pretrained(str(target_src)).vocab_size,
            AutoConfig.from_pretrained(str(draft_src)).vocab_size,
        )
        # 2. tokenizers: the target's is the pair's; the draft's, where it has one, must agree
        tokenizer_src = bundled_dir / "tokenizer" if target_bundled else target_dir
        tokenizer = _try_load_tokenizer(tokenizer_src)
        if tokenizer is None:
            raise ValueError(f"no tokenizer could be loaded from target={str(tokenizer_src)!r}")
        if not draft_bundled and draft != target:
            draft_tokenizer = _try_load_tokenizer(draft_dir)
            if draft_tokenizer is not None:
                _check_vocabularies(len(tokenizer), len(draft_tokenizer), "tokenizer length")
        # 3. weights
        target_model = _load_model(target_src, torch_dtype, torch_device)
        draft_model = _load_model(draft_src, torch_dtype, torch_device)

    if len(tokenizer) > target_model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the models' "
            f"config.vocab_size={target_model.config.vocab_size}"
        )
    if (target_bundled, draft_bundled) == ("target", "draft"):
        name = BUNDLED_NAME
    else:
        name = f"{target or BUNDLED_NAME + '/target'}|{draft or BUNDLED_NAME + '/draft'}"
    return ModelPair(target=target_model, draft=draft_model, tokenizer=tokenizer, name=name)
