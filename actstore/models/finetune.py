"""Fine-tune stage: a sequence-classification head on a model, the paper's recipe.

``finetune(cfg)`` puts a fresh classification head on ``cfg.model``, trains the
whole network with Adam (lr 2e-5, 10 epochs by default, as in the paper) on an
80/10/10 split of the corpus (or the data's own ``split`` field), and keeps the
checkpoint with the best validation accuracy as a normal Hugging Face model
directory in ``cfg.out``. ``actstore extract --model OUT`` then loads its encoder
(the head is dropped), with the same tokenizer, so pretrained and fine-tuned
activations are row-aligned in one store.

Also written to ``cfg.out``:

* ``finetune.json`` -- the config;
* ``report.json`` / ``report.txt`` -- accuracy, per-class precision / recall / F1
  and confusion matrix on the test split for the fine-tuned model and for the
  untouched pretrained model with the same fresh head (the paper's "pre-trained"
  column), plus the per-epoch history;
* ``data.jsonl.gz`` -- the rows used, each with its ``split``;
* ``checkpoint/`` -- the last finished epoch (weights, Adam state, trainer state
  as safetensors + JSON), so a killed run restarted with the same command
  resumes at the next epoch. Removed when training ends unless ``keep_checkpoint``.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from actstore.data.corpora import DataConfig, Record, load_corpus
from actstore.errors import DataError
from actstore.models.checkpoint import optimizer_tensors, restore_optimizer
from actstore.models.config import SPLIT_ALIASES, FinetuneConfig
from actstore.models.loading import auto_device
from actstore.models.names import resolve_model


@dataclass
class ClassReport:
    """A classification report on one split."""

    accuracy: float
    n: int
    labels: list[str]
    per_class: dict[str, dict[str, float]]
    """label -> precision, recall, f1, support."""
    macro_f1: float
    confusion: list[list[int]]
    """``confusion[true][pred]`` in ``labels`` order."""

    def text(self, title: str) -> str:
        w = max(12, *(len(x) for x in self.labels))
        lines = [
            f"{title}: accuracy {self.accuracy:.4f} on {self.n} samples, macro F1 {self.macro_f1:.4f}",
            "",
        ]
        lines.append(f"{'label':>{w}}  precision  recall      f1  support")
        for lab in self.labels:
            p = self.per_class[lab]
            lines.append(
                f"{lab:>{w}}  {p['precision']:9.4f}  {p['recall']:6.4f}  {p['f1']:6.4f}  {int(p['support']):7d}"
            )
        lines += ["", "confusion matrix (rows: true, columns: predicted)"]
        idx = [str(i) for i in range(len(self.labels))]
        lines.append(" " * (w + 2) + " ".join(f"{i:>6}" for i in idx))
        for lab, row in zip(self.labels, self.confusion, strict=True):
            lines.append(f"{lab:>{w}}  " + " ".join(f"{c:>6d}" for c in row))
        lines.append(
            "columns: " + ", ".join(f"{i}={lab}" for i, lab in zip(idx, self.labels, strict=True))
        )
        return "\n".join(lines)


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> ClassReport:
    """Accuracy, per-class precision / recall / F1 and the confusion matrix of integer predictions."""
    k = len(labels)
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (y_true, y_pred), 1)
    per: dict[str, dict[str, float]] = {}
    f1s = []
    for i, lab in enumerate(labels):
        tp = conf[i, i]
        prec = tp / conf[:, i].sum() if conf[:, i].sum() else 0.0
        rec = tp / conf[i].sum() if conf[i].sum() else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[lab] = {
            "precision": float(prec),
            "recall": float(rec),
            "f1": float(f1),
            "support": int(conf[i].sum()),
        }
        if conf[i].sum():
            f1s.append(f1)
    n = int(len(y_true))
    acc = float((y_true == y_pred).mean()) if n else 0.0
    return ClassReport(
        acc, n, list(labels), per, float(np.mean(f1s)) if f1s else 0.0, conf.tolist()
    )


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    out: str
    """The Hugging Face model directory (best validation accuracy)."""
    labels: list[str]
    n_train: int
    n_val: int
    n_test: int
    best_epoch: int
    best_val_accuracy: float
    finetuned: ClassReport
    pretrained: ClassReport
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    seconds: float = 0.0
    skipped: bool = False
    """True when ``out`` already held a finished run of the same config (nothing was trained)."""


# ---------------------------------------------------------------- data
def _read_records(cfg: FinetuneConfig) -> list[Record]:
    data = DataConfig(
        cfg.data.source, cfg.data.text_field, cfg.data.label_field, cfg.data.id_field, None
    )
    recs = [r for r in load_corpus(data) if r.label is not None]
    labels = cfg.labels if cfg.labels is not None else getattr(cfg.data, "labels", None)
    if labels is not None:
        keep = set(labels)
        recs = [r for r in recs if r.label in keep]
    if not recs:
        what = f" with labels {', '.join(labels)}" if labels else " with a label"
        raise DataError(
            f"{cfg.data.source} has no rows{what} (field {cfg.data.label_field!r}): check --label-field / --labels"
        )
    rng = random.Random(cfg.seed)
    rng.shuffle(recs)
    if cfg.data.limit is not None:
        recs = recs[: cfg.data.limit]
    return recs


def split_records(
    recs: list[Record], fractions: tuple[float, float, float], seed: int, use_own: bool = True
) -> dict[str, list[Record]]:
    """Train / val / test: the data's own ``split`` field when present (and ``use_own``), else ``fractions`` of the rows."""
    own = [SPLIT_ALIASES.get((r.split or "").lower()) for r in recs]
    if use_own and all(own):
        out: dict[str, list[Record]] = {"train": [], "val": [], "test": []}
        for r, s in zip(recs, own, strict=True):
            out[s].append(r)  # type: ignore[index]
        # carve validation out of train (1/9 ~ 10% of train+val)
        if not out["val"] and out["train"]:
            n_val = max(1, len(out["train"]) // 9)
            out["val"], out["train"] = out["train"][:n_val], out["train"][n_val:]
        if not out["test"]:
            n_test = max(1, len(out["train"]) // 9)
            out["test"], out["train"] = out["train"][:n_test], out["train"][n_test:]
        return out
    n = len(recs)
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    if fractions[1] > 0:
        n_val = max(1, n_val)
    if fractions[2] > 0:
        n_test = max(1, n_test)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(
            f"only {n} labelled rows: too few to split into train / validation / test; use more data"
        )
    return {
        "train": recs[:n_train],
        "val": recs[n_train : n_train + n_val],
        "test": recs[n_train + n_val :],
    }


def _write_data(path: Path, splits: dict[str, list[Record]]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for name, recs in splits.items():
            for r in recs:
                f.write(
                    json.dumps({"id": r.id, "text": r.text, "label": r.label, "split": name}) + "\n"
                )


# ---------------------------------------------------------------- training
def _batches(
    enc: dict[str, list[list[int]]], y: np.ndarray, order: np.ndarray, batch_size: int, pad_id: int
):
    ids = enc["input_ids"]
    for b0 in range(0, len(order), batch_size):
        sel = order[b0 : b0 + batch_size]
        width = max(len(ids[i]) for i in sel)
        inp = np.full((len(sel), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(sel), width), dtype=np.int64)
        for j, i in enumerate(sel):
            inp[j, : len(ids[i])] = ids[i]
            mask[j, : len(ids[i])] = 1
        yield torch.from_numpy(inp), torch.from_numpy(mask), torch.from_numpy(y[sel])


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    enc: dict[str, list[list[int]]],
    batch_size: int,
    pad_id: int,
    device: str,
) -> np.ndarray:
    """Predicted class index of every encoded text ``(n,)``."""
    model.eval()
    ids = enc["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    preds = np.empty(len(ids), dtype=np.int64)
    dummy = np.zeros(len(ids), dtype=np.int64)
    cuda = device.startswith("cuda")
    pos = 0
    for inp, mask, _ in _batches(enc, dummy, order, batch_size * 2, pad_id):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(
                input_ids=inp.to(device, non_blocking=True),
                attention_mask=mask.to(device, non_blocking=True),
            ).logits
        sel = order[pos : pos + len(inp)]
        preds[sel] = logits.float().argmax(-1).cpu().numpy()
        pos += len(inp)
    return preds


def _save_checkpoint(
    ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """The last epoch as ``checkpoint/`` (weights, optimizer state, trainer state), replaced in one rename."""
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(tmp / "model.safetensors"),
    )
    save_file(optimizer_tensors(opt, prefix=""), str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def _load_checkpoint(
    ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, device: str
) -> dict[str, Any]:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=device))
    restore_optimizer(opt, load_file(str(ckpt / "optimizer.safetensors")), prefix="")
    return json.loads((ckpt / "state.json").read_text())


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = (
        "model",
        "data",
        "lr",
        "batch_size",
        "max_length",
        "seed",
        "labels",
        "split",
        "ignore_split",
    )
    return all(
        json.dumps(a.get(k), sort_keys=True) == json.dumps(b.get(k), sort_keys=True) for k in keys
    )


def finished_run(out: Path, cfg: FinetuneConfig) -> FinetuneResult | None:
    """The saved result when ``out`` holds a finished fine-tune of the same config (same data, model, epochs...)."""
    try:
        saved = json.loads((out / "finetune.json").read_text())
        rep = json.loads((out / "report.json").read_text())
        now = json.loads(json.dumps(cfg.to_dict(), default=str))  # as finetune.json holds it
        if not (_same_run(saved, now) and saved.get("epochs") == now.get("epochs")):
            return None
        rep["finetuned"], rep["pretrained"] = (
            ClassReport(**rep["finetuned"]),
            ClassReport(**rep["pretrained"]),
        )
        names = {f.name for f in fields(FinetuneResult)}
        return FinetuneResult(**{**{k: v for k, v in rep.items() if k in names}, "skipped": True})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def finetune(cfg: FinetuneConfig, progress: bool = True) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.data``; see the module docstring for what is written.

    One writer per output folder (a second run into the same ``--out`` is refused while the first runs);
    a finished run of the same options is not redone.
    """
    from actstore.storage.locks import output_lock

    with output_lock(cfg.out, f"finetune {cfg.model}"):
        return _finetune(cfg, progress)


class _Data(NamedTuple):
    """The corpus split, labelled and tokenized once."""

    splits: dict[str, list[Record]]
    labels: list[str]
    enc: dict[str, Any]
    """Split -> the tokenizer's output (``input_ids`` per text)."""
    ys: dict[str, np.ndarray]
    """Split -> label indices ``(n,)``."""
    pad_id: int


def _finetune(cfg: FinetuneConfig, progress: bool) -> FinetuneResult:
    t0 = time.perf_counter()
    device = auto_device(cfg.device)
    out = Path(cfg.out)
    done = finished_run(out, cfg)
    if done is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    data = _prepare_data(cfg, out)
    torch.manual_seed(cfg.seed)
    model = _new_classifier(resolve_model(cfg.model), data.labels).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ckpt = out / "checkpoint"
    state = _restore(ckpt, cfg, model, opt, device)
    # a fresh run: first the untouched pretrained encoder with the same fresh head
    if state is None:
        pre = classification_report(
            data.ys["test"],
            predict(model, data.enc["test"], cfg.batch_size, data.pad_id, device),
            data.labels,
        )
        _write_data(out / "data.jsonl.gz", data.splits)
        state = {
            "epoch": 0,
            "history": [],
            "best": {"epoch": 0, "val_accuracy": -1.0},
            "pretrained": asdict(pre),
        }
    start_epoch = int(state["epoch"])
    for epoch in range(start_epoch, cfg.epochs):
        train_loss = _train_epoch(model, opt, data, cfg, epoch, device, progress)
        val_src = "val" if len(data.ys["val"]) else "train"
        val_acc = float(
            (
                predict(model, data.enc[val_src], cfg.batch_size, data.pad_id, device)
                == data.ys[val_src]
            ).mean()
        )
        state["history"].append(
            {"epoch": epoch + 1, "train_loss": train_loss, "val_accuracy": val_acc}
        )
        if progress:
            print(
                f"epoch {epoch + 1}: train loss {train_loss:.4f}, validation accuracy {val_acc:.4f}"
            )
        if val_acc > state["best"]["val_accuracy"]:
            state["best"] = {"epoch": epoch + 1, "val_accuracy": val_acc}
            model.save_pretrained(out)
        state["epoch"] = epoch + 1
        _save_checkpoint(ckpt, model, opt, {**state, "config": cfg.to_dict()})
    return _finish(cfg, out, data, state, start_epoch, device, time.perf_counter() - t0)


def _prepare_data(cfg: FinetuneConfig, out: Path) -> _Data:
    """Read, split and tokenize the corpus; the tokenizer is saved untouched into ``out``."""
    from transformers import AutoTokenizer

    from actstore.models.loading import from_pretrained

    recs = _read_records(cfg)
    splits = split_records(recs, cfg.split, cfg.seed, use_own=not cfg.ignore_split)
    labels = sorted({r.label for r in recs})  # type: ignore[type-var]
    if len(labels) < 2:
        raise DataError(
            f"{cfg.data.source} has only one label ({labels[0]!r}): classification needs at least two"
        )
    lab_idx = {lab: i for i, lab in enumerate(labels)}
    path = resolve_model(cfg.model)
    # saved untouched (calling it with truncation changes its definition), so extraction shares the token index
    from_pretrained(AutoTokenizer, path).save_pretrained(out)
    tok = from_pretrained(AutoTokenizer, path)
    enc = {
        k: tok([r.text for r in v], truncation=True, max_length=cfg.max_length)
        for k, v in splits.items()
    }
    ys = {k: np.array([lab_idx[r.label] for r in v], dtype=np.int64) for k, v in splits.items()}  # type: ignore[index]
    return _Data(splits, labels, enc, ys, tok.pad_token_id if tok.pad_token_id is not None else 0)


def _new_classifier(path: str, labels: list[str]) -> torch.nn.Module:
    """The model with a freshly initialised classification head of ``len(labels)`` classes."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from actstore.models.loading import from_pretrained

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new on purpose: no "newly initialized" warning
    try:
        return from_pretrained(
            AutoModelForSequenceClassification,
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def _restore(
    ckpt: Path, cfg: FinetuneConfig, model: torch.nn.Module, opt: torch.optim.Optimizer, device: str
) -> dict[str, Any] | None:
    """The trainer state of an unfinished run of the same options (weights and optimizer loaded), else None."""
    if not (ckpt / "state.json").exists():
        return None
    if not _same_run(
        json.loads((ckpt / "state.json").read_text()).get("config", {}), cfg.to_dict()
    ):
        return None
    state = _load_checkpoint(ckpt, model, opt, device)
    state.pop("config", None)
    return state


def _train_epoch(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: _Data,
    cfg: FinetuneConfig,
    epoch: int,
    device: str,
    progress: bool,
) -> float:
    """One seeded pass over the training split; returns its mean loss."""
    from tqdm.auto import tqdm

    model.train()
    torch.manual_seed(cfg.seed + 1 + epoch)
    n_train = len(data.ys["train"])
    order = np.random.default_rng(cfg.seed + epoch).permutation(n_train)
    bar = tqdm(
        total=n_train,
        desc=f"finetune epoch {epoch + 1}/{cfg.epochs}",
        unit=" samples",
        disable=not progress,
    )
    loss_sum, n_seen = 0.0, 0
    for inp, mask, y in _batches(
        data.enc["train"], data.ys["train"], order, cfg.batch_size, data.pad_id
    ):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            outp = model(
                input_ids=inp.to(device, non_blocking=True),
                attention_mask=mask.to(device, non_blocking=True),
                labels=y.to(device, non_blocking=True),
            )
        opt.zero_grad(set_to_none=True)
        outp.loss.backward()
        opt.step()
        loss_sum += float(outp.loss.detach()) * len(y)
        n_seen += len(y)
        bar.update(len(y))
        bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}")
    bar.close()
    return loss_sum / max(n_seen, 1)


def _finish(
    cfg: FinetuneConfig,
    out: Path,
    data: _Data,
    state: dict[str, Any],
    start_epoch: int,
    device: str,
    seconds: float,
) -> FinetuneResult:
    """The best epoch's model on the test split; the reports written; the checkpoint dropped unless kept."""
    from transformers import AutoModelForSequenceClassification

    from actstore.models.loading import from_pretrained

    best_model = from_pretrained(AutoModelForSequenceClassification, str(out)).to(device)
    preds = predict(best_model, data.enc["test"], cfg.batch_size, data.pad_id, device)
    best = state["best"]
    res = FinetuneResult(
        out=str(out),
        labels=data.labels,
        n_train=len(data.ys["train"]),
        n_val=len(data.ys["val"]),
        n_test=len(data.ys["test"]),
        best_epoch=int(best["epoch"]),
        best_val_accuracy=float(best["val_accuracy"]),
        finetuned=classification_report(data.ys["test"], preds, data.labels),
        pretrained=ClassReport(**state["pretrained"]),
        history=state["history"],
        resumed_from_epoch=start_epoch,
        seconds=seconds,
    )
    (out / "finetune.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    (out / "report.json").write_text(json.dumps(asdict(res), indent=2))
    (out / "report.txt").write_text(report_text(res) + "\n")
    if not cfg.keep_checkpoint:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return res


def report_text(res: FinetuneResult) -> str:
    """The fine-tune report as plain text: both classification reports and the epoch history."""
    lines = [
        f"fine-tuned model: {res.out}",
        f"split: {res.n_train} train / {res.n_val} validation / {res.n_test} test; best epoch {res.best_epoch} "
        f"(validation accuracy {res.best_val_accuracy:.4f})",
        "",
        res.finetuned.text("fine-tuned (test split)"),
        "",
        res.pretrained.text("pre-trained encoder + same fresh head (test split)"),
        "",
        "epoch  train_loss  val_accuracy",
    ]
    lines += [
        f"{h['epoch']:5d}  {h['train_loss']:10.4f}  {h['val_accuracy']:12.4f}" for h in res.history
    ]
    return "\n".join(lines)


def load_report(model_dir: str) -> dict[str, Any] | None:
    """The ``report.json`` a fine-tune wrote into ``model_dir``, or None."""
    p = Path(model_dir) / "report.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
