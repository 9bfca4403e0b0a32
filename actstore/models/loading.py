"""Loading Hugging Face models and tapping their hidden states layer by layer.

Layer numbers are ``hidden_states`` indices: 0 is the embedding output, ``i``
(1 <= i < N) the output of block ``i``, and ``N`` the model's final hidden state
(after the final norm for models that have one, exactly as ``transformers``
returns it). :class:`LayerTap` captures the requested layers in one forward
pass and stops the pass right after the deepest one, so no block above it runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from actstore.errors import ConfigError, ModelError
from actstore.format.metadata import ModelAttrs
from actstore.models.names import MODEL_DTYPES, resolve_model


@contextlib.contextmanager
def torch_threads(n: int | None) -> Any:
    """torch's CPU threads set to ``n`` for the block (None: left as they are), then restored."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def auto_device(device: str = "auto") -> str:
    """``auto`` -> CUDA when torch sees one, else CPU; an explicit device is checked."""
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device} asked for, but torch sees no CUDA device: use --device cpu"
            )
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def from_pretrained(cls: Any, source: str, **kw: Any) -> Any:
    local = Path(source).exists()
    if local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if not Path(source).is_dir() or not (Path(source) / "config.json").is_file():
            raise ModelError(
                f"{source!r} is not a Hugging Face model directory (no config.json in it): give the folder that "
                "save_pretrained wrote, a Hugging Face id, or bundled:minilm"
            )
    try:
        return cls.from_pretrained(source, **kw)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        where = "directory" if local else "model id"
        raise ModelError(
            f"cannot load model {source!r} ({where}): {(str(exc).strip().splitlines() or [type(exc).__name__])[0]} — "
            "give a Hugging Face id reachable online, a local model directory, or bundled:minilm"
        ) from None


@dataclass
class LoadedModel:
    """A model ready for extraction, with what a store records about it."""

    source: str
    """What the user asked for (id, path or short name)."""
    path: str
    """Resolved id or directory."""
    model: nn.Module
    tokenizer: Any
    n_layers: int
    """Number of transformer blocks; layers 0..n_layers are valid."""
    d_model: int
    max_length: int
    """Default input length: the tokenizer's ``model_max_length`` within ``position_limit``."""
    revision: str | None
    position_limit: int = 512
    """Longest input the model accepts (its position embeddings; the model's whole context for decoder LMs)."""
    dtype: str = "fp32"
    """Precision of the weights as loaded: fp32, fp16 or bf16."""

    @functools.cached_property
    def tokenizer_sha256(self) -> str:
        """:func:`tokenizer_hash` of the tokenizer (computed once)."""
        return tokenizer_hash(self.tokenizer)

    @functools.cached_property
    def tokenizer_ids_sha256(self) -> str:
        """:func:`tokenizer_identity` of the tokenizer (computed once)."""
        return tokenizer_identity(self.tokenizer)

    def info(self) -> ModelAttrs:
        """What a store records of this model (its model group's attributes, less its key and token index)."""
        cfg = self.model.config
        return ModelAttrs(
            source=self.source,
            path=self.path,
            architecture=(getattr(cfg, "architectures", None) or [type(self.model).__name__])[0],
            model_type=getattr(cfg, "model_type", None),
            revision=self.revision,
            n_layers=self.n_layers,
            d_model=self.d_model,
            dtype=self.dtype,
            position_limit=self.position_limit,
            weights_sha256=weights_hash(self.model),
            tokenizer_sha256=self.tokenizer_sha256,
            tokenizer_ids_sha256=self.tokenizer_ids_sha256,
        )


DEFAULT_MAX_LENGTH = 512
"""Default input length when neither --max-length nor the tokenizer says less (decoder LMs allow more when asked)."""


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere; other values checked."""
    if dtype not in MODEL_DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}: choose one of {', '.join(MODEL_DTYPES)}")
    if dtype == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return dtype


def load_model(model: str, device: str = "cpu", dtype: str = "fp32") -> LoadedModel:
    """Load a base model (no task head) and its tokenizer, its weights in ``dtype`` (fp32, fp16, bf16 or auto)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    dtype = resolve_dtype(dtype, device)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    path = resolve_model(model)
    tok = from_pretrained(AutoTokenizer, path)
    net = from_pretrained(AutoModel, path)
    net.eval().to(device=device, dtype=torch_dtype)
    cfg = net.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    d_model = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not n_layers or not d_model:
        raise ModelError(
            f"model {model!r} has no num_hidden_layers/hidden_size in its config: not a transformer actstore knows"
        )
    position_limit = int(
        getattr(cfg, "max_position_embeddings", None)
        or getattr(cfg, "n_positions", None)
        or DEFAULT_MAX_LENGTH
    )
    # the tokenizer's default, which a trainer may have lowered
    tml = getattr(tok, "model_max_length", None)
    max_length = min(position_limit, DEFAULT_MAX_LENGTH)
    if isinstance(tml, int) and tml < 1_000_000:
        max_length = min(max_length, tml)
    revision = getattr(cfg, "_commit_hash", None)
    return LoadedModel(
        model,
        path,
        net,
        tok,
        int(n_layers),
        int(d_model),
        int(max_length),
        revision,
        position_limit,
        dtype,
    )


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's full saved definition, runtime padding/truncation state included.

    What stores before ``tokenizer_ids_sha256`` recorded; still matched so they accept the models they accepted.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # slow tokenizers: vocabulary and special tokens
        text = repr(sorted(tokenizer.get_vocab().items())) + repr(tokenizer.all_special_tokens)
    return hashlib.sha256(text.encode()).hexdigest()


TOKENIZER_IDENTITY = "ids-v1"
"""Version of :func:`tokenizer_identity`'s recipe (stored beside the hash)."""


def tokenizer_identity(tokenizer: Any) -> str:
    """SHA-256 of what decides a tokenizer's token ids, and nothing else.

    The vocabulary and model (WordPiece/BPE/Unigram with their settings), normaliser, pre-tokenizer,
    post-processor (special tokens around a sample), decoder and added/special tokens are hashed; the
    runtime ``truncation`` and ``padding`` state a trainer saved into ``tokenizer.json`` (its max length,
    ``Fixed`` vs ``BatchLongest``) is not, since actstore sets both itself. So a fine-tune saved by
    another trainer, or after changing ``model_max_length``, shares its base model's token index.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for runtime in ("truncation", "padding"):
            spec.pop(runtime, None)
        text = json.dumps(spec, sort_keys=True, ensure_ascii=False)
    else:  # slow tokenizers: vocabulary, special tokens and the class that applies them
        text = (
            repr(sorted(tokenizer.get_vocab().items()))
            + repr(tokenizer.all_special_tokens)
            + type(tokenizer).__name__
        )
    return hashlib.sha256(f"{TOKENIZER_IDENTITY}\n{text}".encode()).hexdigest()


"""Names of a decoder's final norm, applied after the last block (``hidden_states[n_layers]`` is after it)."""
