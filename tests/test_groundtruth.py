"""Ground-truth recovery (SynthSAEBench's metrics): actstore's figures equal SAELens's own evaluation on the same
samples; a perfect dictionary scores perfectly; an SAE trained on a store of a SynthSAEBench-shaped model
recovers its features far better than chance."""

from __future__ import annotations

import pytest
import torch

from actstore.analysis.groundtruth import (
    Encoded,
    actstore_encoder,
    ground_truth_metrics,
    mcc,
    uniqueness,
)

synthetic = pytest.importorskip("sae_lens.synthetic")


@pytest.fixture(scope="module")
def small_model():
    """A SynthSAEBench-shaped model, small: 256 features in 32 dimensions (the 16k one's config, resized)."""
    from actstore.testing.synthbench import synthetic_model, synthsaebench_config

    torch.manual_seed(0)
    return synthetic_model(
        synthsaebench_config(num_features=256, hidden_dim=32, root_nodes=8, ortho_steps=10)
    )


def test_every_figure_equals_saelens_evaluation_on_the_same_samples(small_model):
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    from actstore.testing.synthbench import truth_batches

    torch.manual_seed(1)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=32, d_sae=64, k=4))
    with torch.no_grad():  # a decoder that is not random: some latents near true features
        sae.W_dec[:32] = small_model.feature_dict.feature_vectors[:32] + 0.3 * torch.randn(32, 32)
        sae.W_enc[:] = sae.W_dec.T
        sae.b_enc.normal_(0, 0.5)
    n, batch = 6000, 1000
    theirs = synthetic.eval_sae_on_synthetic_data(
        sae,
        small_model.feature_dict,
        _seeded(small_model.activation_generator, 7),
        num_samples=n,
        batch_size=batch,
    )

    def encode(x: torch.Tensor) -> Encoded:
        lat = sae.encode(x)
        return Encoded(lat, sae.decode(lat))

    ours = ground_truth_metrics(
        sae.W_dec,
        small_model.feature_dict.feature_vectors,
        truth_batches(small_model, n, batch, seed=7),
        encode,
    )
    assert ours.n_rows == n
    assert ours.mcc == pytest.approx(theirs.mcc, abs=1e-6)
    assert ours.uniqueness == pytest.approx(theirs.uniqueness, abs=1e-9)
    assert ours.f1 == pytest.approx(theirs.classification.f1_score, abs=1e-6)
    assert ours.precision == pytest.approx(theirs.classification.precision, abs=1e-6)
    assert ours.recall == pytest.approx(theirs.classification.recall, abs=1e-6)
    assert ours.explained_variance == pytest.approx(theirs.explained_variance, abs=1e-5)
    assert ours.l0 == pytest.approx(theirs.sae_l0, abs=1e-6)
    assert ours.true_l0 == pytest.approx(theirs.true_l0, abs=1e-6)
    assert ours.dead == theirs.dead_latents
    assert 0.1 < ours.f1 < 0.9  # not a degenerate case where any code would agree


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batch_topk_scoring_equals_saelens_scoring_its_training_sae(small_model, tmp_path, arch):
    """SynthSAEBench scores a BatchTopK/Matryoshka SAE with its training activation (each batch of 1024 keeps its
    k x 1024 largest); actstore's ``batch_topk`` encoder of the same SAE, read from SAELens's own save, scores the
    same: every figure, L0 exactly k."""
    import sae_lens

    from actstore.sae.imports import read_saelens
    from actstore.testing.synthbench import truth_batches

    torch.manual_seed(2)
    if arch == "batchtopk":
        sae = sae_lens.BatchTopKTrainingSAE(
            sae_lens.BatchTopKTrainingSAEConfig(
                d_in=32, d_sae=64, k=4, rescale_acts_by_decoder_norm=True
            )
        )
    else:
        sae = sae_lens.MatryoshkaBatchTopKTrainingSAE(
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=32, d_sae=64, k=4, matryoshka_widths=[16, 64]
            )
        )
    with torch.no_grad():  # near the true features, decoder rows of unequal norms
        sae.W_dec[:32] = small_model.feature_dict.feature_vectors[:32] + 0.3 * torch.randn(32, 32)
        sae.W_dec.mul_(0.5 + torch.rand(64, 1))
        sae.W_enc[:] = sae.W_dec.T
        sae.b_enc.normal_(0, 0.5)
        # the inference threshold: batch top-k scoring must not use it
        sae.topk_threshold.fill_(0.3)
    n, batch = 5000, 1024
    theirs = synthetic.eval_sae_on_synthetic_data(
        sae,
        small_model.feature_dict,
        _seeded(small_model.activation_generator, 5),
        num_samples=n,
        batch_size=batch,
    )
    sae.save_model(tmp_path / "sl")
    ours_sae = read_saelens(tmp_path / "sl").sae.eval()
    with torch.no_grad():
        ours, inference = (
            ground_truth_metrics(
                ours_sae.W_dec,
                small_model.feature_dict.feature_vectors,
                truth_batches(small_model, n, batch, seed=5),
                actstore_encoder(ours_sae, batch_topk=batch_topk),
            )
            for batch_topk in (True, False)
        )
    assert ours.l0 == pytest.approx(4.0, abs=1e-9) == pytest.approx(theirs.sae_l0, abs=1e-9)
    assert ours.mcc == pytest.approx(theirs.mcc, abs=1e-5)
    assert ours.f1 == pytest.approx(theirs.classification.f1_score, abs=1e-5)
    assert ours.precision == pytest.approx(theirs.classification.precision, abs=1e-5)
    assert ours.recall == pytest.approx(theirs.classification.recall, abs=1e-5)
    assert ours.explained_variance == pytest.approx(theirs.explained_variance, abs=1e-4)
    assert ours.dead == theirs.dead_latents
    assert abs(inference.l0 - ours.l0) > 0.5  # the threshold's scoring is another one


class _seeded:
    """An activation generator whose first ``sample`` call reseeds torch, as :func:`truth_batches` does."""

    def __init__(self, gen, seed: int) -> None:
        self.gen, self.seed, self.started = gen, seed, False

    def sample(self, n: int) -> torch.Tensor:
        if not self.started:
            torch.manual_seed(self.seed)
            self.started = True
        return self.gen.sample(n)


def test_the_true_dictionary_scores_perfectly(small_model):
    """Latents that are the true codes, with the true directions as decoder: MCC, uniqueness, precision 1; F1 and
    recall 1 on every feature that fired (a feature that never fired scores 0, as SynthSAEBench counts it)."""
    from actstore.testing.synthbench import truth_batches

    feats = small_model.feature_dict.feature_vectors  # (256, 32)
    batches = list(truth_batches(small_model, 20_000, 5000, seed=3))
    fired = torch.stack([(b.codes > 0).any(0) for b in batches]).any(0).float().mean()
    res = ground_truth_metrics(feats, feats, batches, lambda x: Encoded(_codes_of(batches, x), x))
    assert res.mcc == pytest.approx(1.0, abs=1e-6)
    assert res.uniqueness == 1.0
    assert res.f1 == pytest.approx(float(fired), abs=1e-9)
    assert res.explained_variance == pytest.approx(1.0)


def _codes_of(batches, x):
    for b in batches:
        if b.x is x or torch.equal(b.x, x):
            return b.codes
    raise AssertionError("unknown batch")


def test_mcc_and_uniqueness_see_a_permuted_and_duplicated_decoder():
    torch.manual_seed(0)
    feats = torch.linalg.qr(torch.randn(16, 16))[0]  # (16, 16) orthonormal
    perm = feats[torch.randperm(16)] * -2.0  # the same directions, reordered, flipped, scaled
    assert mcc(perm, feats) == pytest.approx(1.0, abs=1e-6)
    assert uniqueness(perm, feats) == 1.0
    dup = torch.cat(
        [feats[:8], feats[:8]]
    )  # every direction twice: half the latents are duplicates
    assert uniqueness(dup, feats) == 0.5


def test_an_sae_trained_on_the_store_recovers_the_planted_features(small_model, tmp_path):
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae
    from actstore.testing.synthbench import truth_batches, write_synthbench_store

    path = str(tmp_path / "ssb.zarr")
    write_synthbench_store(path, small_model, 60_000, seed=0, chunk_rows=4096)
    cfg = TrainConfig(model="synth", layer=0, arch="batchtopk", d_sae=128, k=8, epochs=2, batch_size=256,
                      device="cpu", name="btk")  # fmt: skip
    sae = train_sae(path, cfg, progress=False).sae.eval()
    feats = small_model.feature_dict.feature_vectors

    def score(s):
        return ground_truth_metrics(
            s.W_dec, feats, truth_batches(small_model, 5000, 1000, seed=9), actstore_encoder(s)
        )

    trained = score(sae)
    from actstore.sae.model import SAE

    torch.manual_seed(0)
    untrained = score(SAE(sae.cfg).eval())  # the same SAE before training: chance
    assert trained.mcc > untrained.mcc + 0.05, (trained, untrained)
    assert trained.f1 > 3 * untrained.f1, (trained, untrained)
    assert trained.explained_variance > 0.8, trained
