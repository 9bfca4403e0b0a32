"""Fine-tune stage: a tiny BERT learns a trivially separable toy task; reports, resume, and row-aligned extraction."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from actstore.cli import main
from actstore.data.corpora import DataConfig
from actstore.errors import ConfigError, DataError
from actstore.models.config import FinetuneConfig
from actstore.models.finetune import classification_report, finetune, split_records


def toy_rows(n: int, seed: int = 1) -> list[dict]:
    """Label 'a' texts are made of alpha words, label 'b' of omega words: trivially separable."""
    rng = random.Random(seed)
    a_words, b_words = ["apple", "house", "green", "river"], ["zero", "night", "black", "stone"]
    rows = []
    for i in range(n):
        lab = "a" if i % 2 == 0 else "b"
        words = [rng.choice(a_words if lab == "a" else b_words) for _ in range(rng.randint(3, 8))]
        rows.append({"id": f"t{i}", "text": " ".join(words), "label": lab})
    return rows


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("toy") / "toy.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in toy_rows(80)) + "\n")
    return str(p)


def test_classification_report_by_hand() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    rep = classification_report(y_true, y_pred, ["x", "y", "z"])
    assert rep.accuracy == pytest.approx(4 / 6)
    assert rep.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert rep.per_class["x"]["precision"] == pytest.approx(1.0)
    assert rep.per_class["x"]["recall"] == pytest.approx(2 / 3)
    assert rep.per_class["y"]["precision"] == pytest.approx(0.5)
    assert rep.per_class["z"]["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert "confusion matrix" in rep.text("t")


def test_split_fractions_and_own_split() -> None:
    from actstore.data.corpora import Record

    recs = [Record(str(i), "t", "a") for i in range(100)]
    s = split_records(recs, (0.8, 0.1, 0.1), 0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [80, 10, 10]
    own = [Record(str(i), "t", "a", "train" if i < 90 else "test") for i in range(100)]
    s = split_records(own, (0.8, 0.1, 0.1), 0)
    assert len(s["test"]) == 10 and len(s["val"]) == 10 and len(s["train"]) == 80
    assert all(r.split == "test" for r in s["test"])
    mixed = [Record(str(i), "t", "a", "test" if i % 10 == 0 else "train") for i in range(100)]
    # --ignore-split: fractions of the (shuffled) rows
    s = split_records(mixed, (0.8, 0.1, 0.1), 0, use_own=False)
    assert [len(s[k]) for k in ("train", "val", "test")] == [80, 10, 10]
    assert sum(r.split == "test" for r in s["test"]) == 1


def test_config_checks() -> None:
    with pytest.raises(ConfigError):
        FinetuneConfig("m", DataConfig("x.jsonl"), "out", epochs=0)
    with pytest.raises(ConfigError):
        FinetuneConfig("m", DataConfig("x.jsonl"), "out", split=(0.5, 0.1, 0.1))


def test_finetune_learns_toy_task_and_resumes(tmp_path, tiny_bert_dir, toy_file) -> None:
    out = tmp_path / "ft"
    cfg = FinetuneConfig(
        tiny_bert_dir,
        DataConfig(toy_file),
        str(out),
        epochs=1,
        lr=3e-3,
        batch_size=8,
        max_length=16,
        device="cpu",
        keep_checkpoint=True,
    )
    r1 = finetune(cfg, progress=False)
    assert (out / "checkpoint" / "state.json").exists()
    cfg2 = FinetuneConfig(
        tiny_bert_dir,
        DataConfig(toy_file),
        str(out),
        epochs=4,
        lr=3e-3,
        batch_size=8,
        max_length=16,
        device="cpu",
    )
    res = finetune(cfg2, progress=False)
    assert res.resumed_from_epoch == 1
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    assert res.history[0] == r1.history[0]
    assert (res.n_train, res.n_val, res.n_test) == (64, 8, 8)
    assert res.finetuned.accuracy == 1.0
    assert (
        res.pretrained.n == 8 and len(res.pretrained.confusion) == 2
    )  # the untouched encoder, same fresh head
    assert not (out / "checkpoint").exists()
    rep = json.loads((out / "report.json").read_text())
    assert rep["labels"] == ["a", "b"] and rep["finetuned"]["accuracy"] == 1.0
    assert rep["pretrained"]["accuracy"] == res.pretrained.accuracy
    assert "pre-trained" in (out / "report.txt").read_text()
    cfgj = json.loads((out / "config.json").read_text())
    assert cfgj["id2label"] == {"0": "a", "1": "b"}

    # the fine-tuned directory extracts into the same store as its base, row-aligned
    from actstore import open_store
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    store = str(tmp_path / "s.zarr")
    common = dict(
        data=DataConfig(toy_file, limit=20), layers="all", codec="fp32", chunk_rows=64, device="cpu"
    )
    extract(store, ExtractConfig(model=tiny_bert_dir, name="pre", **common), progress=False)
    extract(store, ExtractConfig(model=str(out), name="ft", **common), progress=False)
    st = open_store(store)
    assert st.models == ["ft", "pre"] and len(st.tokenization_keys()) == 1
    a, b = st.activations("pre", 0)[:], st.activations("ft", 0)[:]
    assert a.shape == b.shape and not np.allclose(a, b)


def test_finetune_cli_and_errors(tmp_path, tiny_bert_dir, toy_file) -> None:
    out = tmp_path / "ft"
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            "--model",
            tiny_bert_dir,
            "--data",
            toy_file,
            "--out",
            str(out),
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--batch-size",
            "16",
            "--max-length",
            "16",
            "--limit",
            "40",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and (out / "model.safetensors").exists()
    rows = [json.loads(x) for x in __import__("gzip").open(out / "data.jsonl.gz", "rt")]
    assert len(rows) == 40 and {x["split"] for x in rows} == {"train", "val", "test"}
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            "--model",
            tiny_bert_dir,
            "--data",
            toy_file,
            "--out",
            str(out),
            "--labels",
            "q",
        ],
    )
    assert r.exit_code != 0 and "no rows with labels q" in r.output
    with pytest.raises(DataError):
        one = Path(tmp_path / "one.jsonl")
        one.write_text(
            json.dumps({"text": "x", "label": "a"})
            + "\n"
            + json.dumps({"text": "y", "label": "a"})
            + "\n"
        )
        finetune(
            FinetuneConfig(tiny_bert_dir, DataConfig(str(one)), str(tmp_path / "o2"), device="cpu"),
            progress=False,
        )
