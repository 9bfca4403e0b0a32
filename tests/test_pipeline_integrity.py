"""Everything the pipeline writes is covered by a checksum: verify finds no unlisted files after train/encode/diff."""

from pathlib import Path

import actstore
from actstore.analysis.config import DiffConfig
from actstore.analysis.diff import diff_features
from actstore.encoding.config import EncodeConfig
from actstore.encoding.encode import encode
from actstore.sae.config import TrainConfig
from actstore.sae.train import train_sae
from actstore.storage.verify import verify


def test_train_encode_diff_leave_a_verifiable_store(tiny_store):
    st = actstore.open_store(tiny_store, writable=True)
    for name, seed in (("a", 0), ("b", 1)):
        cfg = TrainConfig(
            model="tiny",
            layer=2,
            arch="topk",
            k=4,
            d_sae=16,
            epochs=1,
            batch_size=64,
            name=name,
            seed=seed,
            device="cpu",
        )
        train_sae(st, cfg, progress=False)
        encode(
            st,
            EncodeConfig(sae=name, batch_rows=256, n_buckets=2, row_group_rows=64),
            progress=False,
        )
    diff_features(st, DiffConfig(sae_a="a", sae_b="b"))
    rep = verify(st.loc)
    assert rep.ok, [(p.key, p.kind) for p in rep.problems]
    assert not [p for p in rep.problems if p.kind == "unlisted"]
    # and a changed SAE weight file is caught
    path = Path(st.loc.fs_path("saes/a/sae.safetensors"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    bad = verify(st.loc)
    assert not bad.ok and [p.key for p in bad.problems if p.kind == "corrupted"] == [
        "saes/a/sae.safetensors"
    ]
