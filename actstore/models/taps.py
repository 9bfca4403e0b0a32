"""The layer tap: which module of a model produces ``hidden_states[L]``, hooks that capture it, and splicing."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from actstore.errors import ModelError
from actstore.models.loading import LoadedModel


def find_blocks(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The ModuleList holding the model's transformer blocks."""
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers:
            best = mod
            break
    if best is None:
        raise ModelError(
            f"cannot find the {n_layers} transformer blocks of {type(model).__name__}: not supported yet"
        )
    return best


FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm")


def final_norm(model: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The norm applied to the last block's output before ``hidden_states[n_layers]`` (GPT-2's ``ln_f``), if any.

    Looked up on the module that holds ``blocks`` (the base model), so a classification head's own norms
    are never taken for it.
    """
    for _, mod in model.named_modules():
        if any(child is blocks for child in mod.children()):
            for name in FINAL_NORMS:
                norm = getattr(mod, name, None)
                if isinstance(norm, nn.Module):
                    return norm
            return None
    return None


@contextlib.contextmanager
def splice(model: nn.Module, n_layers: int, layer: int, fn: Any) -> Any:
    """Replace ``hidden_states[layer]`` by ``fn(h)`` (``(batch, seq, d_model)``) in every forward pass inside the block.

    The same sites as :class:`LayerTap` reads: the input of block ``layer`` for ``layer < n_layers``; for the
    last, the output of the final norm when the model has one (GPT-2's ``ln_f``), else of the last block.
    """
    blocks = find_blocks(model, n_layers)
    if not 0 <= layer <= n_layers:
        raise ModelError(f"layer {layer} is out of range 0..{n_layers}")

    def pre_hook(_m: Any, args: tuple, kwargs: dict) -> tuple:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    def post_hook(_m: Any, _args: tuple, out: Any) -> Any:
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

    if layer < n_layers:
        handle = blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = (final_norm(model, blocks) or blocks[n_layers - 1]).register_forward_hook(
            post_hook
        )
    try:
        yield
    finally:
        handle.remove()


class StopForward(Exception):
    """Raised inside a hook to end the forward pass above the deepest layer."""


class LayerTap:
    """Capture ``hidden_states[layer]`` for several layers in one truncated forward pass.

    Usage::

        tap = LayerTap(loaded, [2, 4, 6])
        hs = tap(input_ids, attention_mask)   # {layer: (batch, seq, d_model)}
    """

    def __init__(self, loaded: LoadedModel, layers: list[int]) -> None:
        check_layers(loaded, layers)
        self.loaded = loaded
        self.layers = sorted(set(layers))
        self.deepest = self.layers[-1]
        self.blocks = find_blocks(loaded.model, loaded.n_layers)
        self._out: dict[int, torch.Tensor] = {}

    def _hook(self, idx: int):
        def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if idx in self.layers:
                self._out[idx] = hidden
            if idx == self.deepest:
                raise StopForward

        return pre_hook

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        self._out = {}
        n = self.loaded.n_layers
        handles = [
            self.blocks[i].register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i in range(min(self.deepest + 1, n))
        ]
        out = forward_until_stop(self.loaded, input_ids, attention_mask, handles)
        if out is not None and n in self.layers:
            self._out[n] = out.last_hidden_state
        return {layer: self._out[layer] for layer in self.layers}


def forward_until_stop(
    loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, handles: list
) -> Any:
    """Run the model with capturing hooks (``handles``, removed after): its output, or None when a hook ended the
    pass early (:class:`StopForward`)."""
    try:
        return loaded.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        return None
    finally:
        for hd in handles:
            hd.remove()


def check_layers(loaded: LoadedModel, layers: list[int]) -> None:
    if not layers:
        raise ModelError("no layers requested: pass --layers, e.g. --layers 2,4,6")
    bad = [layer for layer in layers if layer < 0 or layer > loaded.n_layers]
    if bad:
        raise ModelError(
            f"layer {bad[0]} is out of range for {loaded.source}: it has layers 0 (embeddings) to {loaded.n_layers}"
        )
