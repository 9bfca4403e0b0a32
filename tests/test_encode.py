"""Encode stage: the Parquet feature table equals a dense numpy re-encode with the same SAE weights."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from helpers import dense_numpy, killed_on_call, make_sae

import actstore
from actstore.cli import main
from actstore.encoding.config import EncodeConfig
from actstore.encoding.encode import encode, sparse_encode
from actstore.encoding.sort import Entries, Spiller, merge_runs, sort_block, sort_entries
from actstore.encoding.table import files_dir, read_encoding, read_pending
from actstore.errors import ConfigError, StoreError
from actstore.sae.config import SAEConfig
from actstore.sae.files import save_sae
from actstore.sae.model import SAE


def table_dense(store, name: str, shape: tuple[int, int]) -> np.ndarray:
    t = actstore.features(store, name).collect()
    out = np.zeros(shape)
    out[t["row"].to_numpy(), t["feature"].to_numpy()] = t["value"].to_numpy()
    return out


def acts_files(store, name: str) -> list[str]:
    man = read_encoding(store, name)
    return [store.loc.join(f"{files_dir(name, man)}/acts/{f['file']}") for f in man.files]


@pytest.mark.parametrize(("arch", "k"), [("relu-l1", None), ("topk", 5)])
def test_encode_equals_dense_numpy(tiny_store, arch, k):
    st = actstore.open_store(tiny_store, writable=True)
    sae = make_sae(st, "s", arch, k=k)
    res = encode(
        st,
        EncodeConfig(sae="s", batch_rows=100, n_buckets=3, spill_entries=700, row_group_rows=50),
        progress=False,
    )
    ref = dense_numpy(st, sae)
    n_rows = len(st.activations("tiny", 2))
    got = table_dense(st, "s", ref.shape)
    assert res.n_rows == n_rows and res.n_feature_rows == int((got > 0).sum())
    assert abs(res.n_feature_rows - int((ref > 0).sum())) <= 2  # float32 vs float64 at exactly 0
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    if arch == "topk":
        assert ((got > 0).sum(axis=1) <= k).all()

    # per-feature statistics over all rows, zeros included
    stats = actstore.feature_stats(st, "s").sort("feature").collect()
    np.testing.assert_array_equal(stats["n_active"].to_numpy(), (got > 0).sum(axis=0))
    np.testing.assert_allclose(stats["frequency"].to_numpy(), (got > 0).mean(axis=0))
    np.testing.assert_allclose(stats["mean"].to_numpy(), ref.mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["max"].to_numpy(), ref.max(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["variance"].to_numpy(), ref.var(axis=0), rtol=1e-3, atol=1e-6)

    # layout: spill gone, every file sorted by (feature, value desc, row) and within its feature range
    assert not st.loc.exists(f"{files_dir('s', read_encoding(st, 's'))}/spill")
    man = read_encoding(st, "s")
    assert man.complete and man.n_buckets == 3
    for f in man.files:
        t = pq.read_table(st.loc.join(f"{files_dir('s', read_encoding(st, 's'))}/acts/{f['file']}"))
        feat, val, row = (t[c].to_numpy() for c in ("feature", "value", "row"))
        assert ((feat >= f["feature_start"]) & (feat < f["feature_stop"])).all()
        key = np.lexsort((row, -val, feat))
        np.testing.assert_array_equal(key, np.arange(len(feat)))


def test_bucket_count_grows_with_the_corpus_so_a_bucket_fits_in_memory():
    """A bucket is merged whole in memory at the end: its expected activations stay under BUCKET_ENTRIES (4M), at 2M
    tokens as at 2 billion, by having more buckets (issue 29: memory bounded by work in flight, not the corpus)."""
    from actstore.encoding.plan import BUCKET_ENTRIES, bucket_count

    cfg = EncodeConfig(sae="s")  # 16 buckets at least
    assert bucket_count(cfg, 3072, 2_000_000, 32) == 16  # 64M activations: 4M a bucket
    assert bucket_count(cfg, 3072, 20_000_000, 32) == 160
    assert bucket_count(cfg, 3072, 2_000_000_000, 32) == 3072  # capped at one feature a bucket
    for n in (2_000_000, 20_000_000, 200_000_000):
        assert n * 32 / bucket_count(cfg, 12288, n, 32) <= BUCKET_ENTRIES
    assert (
        bucket_count(EncodeConfig(sae="s", spill_entries=100, workers=1), 3072, 20_000_000, 32)
        == 160
    )  # memory knobs


def test_row_groups_let_a_feature_lookup_read_only_its_own(tiny_store):
    st = actstore.open_store(tiny_store, writable=True)
    make_sae(st, "s", "topk", k=8)
    encode(st, EncodeConfig(sae="s", n_buckets=2, row_group_rows=64), progress=False)
    stats = actstore.feature_stats(st, "s").collect()
    ranges = []
    for path in acts_files(st, "s"):
        md = pq.ParquetFile(path).metadata
        ranges += [
            (md.row_group(i).column(1).statistics.min, md.row_group(i).column(1).statistics.max)
            for i in range(md.num_row_groups)
        ]
    n_groups = len(ranges)
    for feature, n_active in zip(stats["feature"], stats["n_active"], strict=True):
        touched = sum(lo <= feature <= hi for lo, hi in ranges)
        assert touched <= -(-n_active // 64) + 1
    assert n_groups > 4


def test_resume_after_crash_gives_identical_table(tiny_store, monkeypatch):
    from actstore.encoding import encode as enc

    st = actstore.open_store(tiny_store, writable=True)
    make_sae(st, "s", "relu-l1")
    cfg = EncodeConfig(sae="s", batch_rows=64, n_buckets=4, spill_entries=300)
    real_flush, calls = Spiller.flush, []

    def crashing_flush(self, start):
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_flush(self, start)

    monkeypatch.setattr(Spiller, "flush", crashing_flush)
    with pytest.raises(KeyboardInterrupt):
        encode(st, cfg, progress=False)
    monkeypatch.setattr(Spiller, "flush", real_flush)
    assert read_encoding(st, "s") is None  # nothing published yet
    man = read_pending(st, "s")
    assert not man.complete and man.spilled_rows > 0
    res = encode(st, cfg, progress=False)
    assert res.resumed_from == man.spilled_rows
    resumed = actstore.features(st, "s").collect()

    fresh_path = tiny_store + "-fresh"
    shutil.copytree(tiny_store, fresh_path)
    fresh = actstore.open_store(fresh_path, writable=True)
    # no background threads this time: the same table
    encode(
        fresh,
        EncodeConfig(
            sae="s", batch_rows=64, n_buckets=4, spill_entries=300, workers=1, overwrite=True
        ),
        progress=False,
    )
    assert resumed.equals(actstore.features(fresh, "s").collect())
    # a finished encoding is not redone
    assert encode(st, cfg, progress=False).skipped

    # killed while writing the final files: restarts at the last committed spill, same table again
    real_finish = enc.finish_bucket
    monkeypatch.setattr(enc, "finish_bucket", killed_on_call(real_finish, 3))
    with pytest.raises(KeyboardInterrupt):
        encode(
            st,
            EncodeConfig(sae="s", batch_rows=64, n_buckets=4, spill_entries=300, overwrite=True),
            progress=False,
        )
    monkeypatch.setattr(enc, "finish_bucket", real_finish)
    assert read_encoding(st, "s").complete  # the finished encoding survived the failed --overwrite
    assert actstore.features(st, "s").collect().equals(actstore.features(fresh, "s").collect())
    man = read_pending(st, "s")
    assert not man.complete and man.spilled_rows > 0
    res = encode(st, cfg, progress=False)  # resumes the unfinished re-encode
    assert res.resumed_from == man.spilled_rows and not st.loc.exists(
        f"{files_dir('s', man)}/spill"
    )
    assert [d for d in st.loc.list_dirs("features/s")] == [man.dir]  # the old generation is gone
    assert actstore.features(st, "s").collect().equals(actstore.features(fresh, "s").collect())


def test_changed_weights_need_overwrite(tiny_store):
    st = actstore.open_store(tiny_store, writable=True)
    make_sae(st, "s", "relu-l1", seed=0)
    encode(st, EncodeConfig(sae="s"), progress=False)
    sae2 = make_sae(st, "s", "relu-l1", seed=1)
    with pytest.raises(StoreError, match="--overwrite"):
        encode(st, EncodeConfig(sae="s"), progress=False)
    encode(st, EncodeConfig(sae="s", overwrite=True), progress=False)
    np.testing.assert_allclose(
        table_dense(st, "s", (len(st.activations("tiny", 2)), 40)),
        dense_numpy(st, sae2),
        rtol=1e-4,
        atol=1e-5,
    )


def test_errors_name_the_fix(tiny_store):
    st = actstore.open_store(tiny_store, writable=True)
    with pytest.raises(actstore.ActstoreError, match="actstore train"):
        encode(st, EncodeConfig(sae="missing"), progress=False)
    with pytest.raises(ConfigError):
        EncodeConfig(sae="s", n_buckets=0)
    tk = st.model_info("tiny").tokenization
    save_sae(
        st,
        SAE(SAEConfig(arch="relu-l1", d_in=16, d_sae=8, model="tiny", layer=2, tokenization=tk)),
        "narrow",
    )
    with pytest.raises(ConfigError, match="reads d_in 16 but tiny layer 2 .* has d_model 32"):
        encode(st, EncodeConfig(sae="narrow"), progress=False)


def test_sort_entries_orders_negative_and_positive_values():
    rng = np.random.default_rng(0)
    feat = rng.integers(0, 5, 200).astype(np.int32)
    value = rng.normal(size=200).astype(np.float32)
    value[:10] = 0.5  # ties keep row order
    row = np.arange(200, dtype=np.int64)
    order = sort_entries(row, feat, value)
    np.testing.assert_array_equal(order, np.lexsort((row, -value, feat)))


@pytest.mark.parametrize(
    ("arch", "k", "threshold"),
    [("relu-l1", None, 0.0), ("topk", 3, 0.0), ("batchtopk", 3, 0.0), ("batchtopk", 3, 0.2)],
)
def test_sparse_encode_equals_dense_encode(arch, k, threshold):
    torch.manual_seed(3)
    sae = SAE(SAEConfig(arch=arch, d_in=8, d_sae=12, k=k, norm_scale=0.5))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(12) * 0.3 - 0.3)
        sae.threshold.fill_(threshold)
    x = torch.randn(50, 8)
    with torch.inference_mode():
        dense = sae.encode(x).numpy()  # (50, d_sae)
        e = sparse_encode(sae, x)
    got = np.zeros_like(dense)
    got[e.row, e.feature] = e.value
    np.testing.assert_array_equal(got, dense)
    assert (
        e.row.size == int((dense != 0).sum())
        and e.feature.dtype == np.int32
        and e.value.dtype == np.float32
    )


@pytest.mark.parametrize(
    ("d_sae", "rows"), [(40, 100), (1 << 30, 100), (40, 1 << 40)]
)  # packed keys; too wide for them
def test_block_sort_and_merge_equal_lexsort(d_sae, rows):
    rng = np.random.default_rng(0)
    runs, blocks = [], []
    for b in range(5):  # blocks of 20 local rows, in row order
        n = 60
        local = np.sort(rng.integers(0, 20, n))  # entries come row-major
        feat = rng.integers(0, 40, n).astype(np.int32) * (d_sae // 40)
        value = rng.normal(size=n).astype(np.float32)
        value[:8] = 0.25  # ties: broken by row
        row0 = b * (rows // 5)  # rows spread over [0, rows)
        blocks.append((local + row0, feat, value))
        run = sort_block(Entries(local.astype(np.int64), feat, value), row0)
        key = np.lexsort((run.row, -run.value, run.feature))
        np.testing.assert_array_equal(key, np.arange(n))  # each block sorted
        runs.append(run)
    row, feat, value = (np.concatenate([b[i] for b in blocks]) for i in range(3))
    order = np.lexsort((row, -value, feat))
    merged = merge_runs(runs)
    np.testing.assert_array_equal(merged.row, row[order])
    np.testing.assert_array_equal(merged.feature, feat[order])
    np.testing.assert_array_equal(merged.value, value[order])


def test_cli_encode(tiny_store):
    st = actstore.open_store(tiny_store, writable=True)
    make_sae(st, "s", "topk", k=4)
    r = CliRunner().invoke(
        main,
        ["encode", tiny_store, "--sae", "s", "--quiet", "--spill-entries", "100", "--workers", "1"],
    )
    assert r.exit_code == 0, r.output
    assert "SAE s (tiny layer 2)" in r.output and "feature rows" in r.output
    cfg = read_encoding(st, "s").config
    assert (cfg["spill_entries"], cfg["workers"]) == (100, 1)
    r = CliRunner().invoke(main, ["encode", tiny_store, "--sae", "s", "--quiet"])
    assert "already encoded" in r.output
    r = CliRunner().invoke(main, ["encode", tiny_store, "--sae", "nope", "--quiet"])
    assert r.exit_code != 0 and "no SAE named 'nope'" in r.output
