"""Checkpoints of a training run in safetensors (no pickle): weights, optimizer state, and JSON metadata.

One implementation for every trainer (``sae.train`` and ``models.finetune``): optimizer state is stored as
tensors named ``<prefix><param index>.<state key>`` (the index of the parameter in the optimizer's param groups),
and restored through ``load_state_dict``, which puts each tensor on its parameter's device.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "opt.") -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as CPU tensors: ``{prefix}{i}.{key}``."""
    out: dict[str, torch.Tensor] = {}
    for pid, state in opt.state_dict()["state"].items():
        for key, val in state.items():
            out[f"{prefix}{pid}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
    return out


def restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str = "opt."
) -> None:
    """Load the state written by :func:`optimizer_tensors` (other tensors in ``tensors`` are ignored)."""
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        if key.startswith(prefix):
            pid, k = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[k] = val
    sd["state"] = state
    opt.load_state_dict(sd)


class Packed(NamedTuple):
    tensors: dict[str, torch.Tensor]
    """Name -> tensor, on the CPU."""
    meta: dict[str, Any]
    """The JSON metadata it was packed with (each value decoded)."""


def pack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """One safetensors blob of ``tensors`` with ``meta`` (each value JSON-encoded) in its header."""
    md = {k: json.dumps(v, default=float) for k, v in meta.items()}
    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=md)


def unpack(raw: bytes) -> Packed:
    """The tensors and metadata of a blob written by :func:`pack`."""
    # safetensors header: 8-byte length, then JSON with __metadata__
    n = int.from_bytes(raw[:8], "little")
    md = json.loads(raw[8 : 8 + n]).get("__metadata__", {})
    return Packed(st_load(raw), {k: json.loads(v) for k, v in md.items()})
