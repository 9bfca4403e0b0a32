"""Sites inside a block (``extract --site``): where a transcoder or a per-sublayer SAE reads.

- ``resid``: ``hidden_states[L]``, the residual stream entering block L (:class:`~actstore.models.taps.LayerTap`);
- ``mlp_in``: the input of block L's MLP (GPT-2's ``ln_2`` output, Llama's ``post_attention_layernorm`` output,
  BERT's attention output after its LayerNorm: what ``intermediate`` reads);
- ``mlp_out``: the output of block L's MLP, before it is added to the residual stream (BERT: ``output.dense``,
  before dropout, the residual add and the LayerNorm);
- ``attn_out``: the output of block L's attention, before the residual add (BERT: ``attention.output.dense``).

Sublayer sites exist for blocks ``0 .. n_layers - 1``. Their modules are found by name in each block
(:data:`SITE_MODULES`, first match), so BERT, GPT-2, GPT-NeoX and Llama-family blocks are covered;
``tests/test_sites.py`` checks each stored row against hooks placed by hand.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from actstore.errors import ModelError
from actstore.models.loading import LoadedModel
from actstore.models.names import SITES
from actstore.models.taps import (
    LayerTap,
    StopForward,
    check_layers,
    find_blocks,
    forward_until_stop,
)

SITE_MODULES: dict[str, tuple[str, ...]] = {
    "mlp_in": ("intermediate", "mlp", "feed_forward", "ffn"),
    "mlp_out": ("output.dense", "mlp", "feed_forward", "ffn"),
    "attn_out": ("attention.output.dense", "attn", "self_attn", "attention"),
}
"""Per site, the names of the block's submodule it reads, tried in order (BERT's first)."""

READS_INPUT = {"mlp_in"}
"""Sites read at their module's input (the others at its output)."""


def site_module(block: nn.Module, site: str, where: str) -> nn.Module:
    """The submodule of ``block`` that ``site`` reads."""
    for name in SITE_MODULES[site]:
        mod: Any = block
        for part in name.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.Module):
            return mod
    raise ModelError(
        f"{where}: no module for --site {site} in its blocks ({type(block).__name__}; looked for "
        f"{', '.join(SITE_MODULES[site])}): use --site resid"
    )


def check_site_layers(loaded: LoadedModel, layers: list[int], site: str) -> None:
    """``layers`` are block indices for a sublayer site: ``0 .. n_layers - 1``."""
    if site not in SITES:
        raise ModelError(f"unknown --site {site!r}: choose one of {', '.join(SITES)}")
    if site == "resid":
        check_layers(loaded, layers)
        return
    if not layers:
        raise ModelError("no layers requested: pass --layers, e.g. --layers 2,4,6")
    bad = [layer for layer in layers if not 0 <= layer < loaded.n_layers]
    if bad:
        raise ModelError(
            f"layer {bad[0]} has no --site {site}: {loaded.source} has blocks 0 to {loaded.n_layers - 1}"
        )


class SiteTap:
    """Capture one sublayer site of several blocks in one truncated forward pass.

    Usage::

        tap = SiteTap(loaded, [1, 3], "mlp_out")
        hs = tap(input_ids, attention_mask)   # {block: (batch, seq, d_model)}
    """

    def __init__(self, loaded: LoadedModel, layers: list[int], site: str) -> None:
        check_site_layers(loaded, layers, site)
        self.loaded = loaded
        self.site = site
        self.layers = sorted(set(layers))
        self.deepest = self.layers[-1]
        blocks = find_blocks(loaded.model, loaded.n_layers)
        self.modules = {i: site_module(blocks[i], site, loaded.source) for i in self.layers}
        self._out: dict[int, torch.Tensor] = {}

    def _hook(self, idx: int) -> Any:
        def keep(value: torch.Tensor) -> None:
            self._out[idx] = value
            if idx == self.deepest:
                raise StopForward

        if self.site in READS_INPUT:

            def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                keep(args[0] if args else kwargs["hidden_states"])

            return pre_hook

        def post_hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            keep(out[0] if isinstance(out, tuple) else out)

        return post_hook

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        self._out = {}
        handles = []
        for i, mod in self.modules.items():
            if self.site in READS_INPUT:
                handles.append(mod.register_forward_pre_hook(self._hook(i), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(self._hook(i)))
        forward_until_stop(self.loaded, input_ids, attention_mask, handles)
        return {layer: self._out[layer] for layer in self.layers}


Tap = LayerTap | SiteTap
"""What extraction runs: ``tap(input_ids, attention_mask) -> {layer: (batch, seq, d_model)}``."""


def make_tap(loaded: LoadedModel, layers: list[int], site: str = "resid") -> Tap:
    """The tap of ``site`` at ``layers``: :class:`LayerTap` for the residual stream, else :class:`SiteTap`."""
    if site == "resid":
        return LayerTap(loaded, layers)
    return SiteTap(loaded, layers, site)
