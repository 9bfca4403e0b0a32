"""Planted stores with a long tail of rare features (``planted_dictionary(..., zipf=...)``), as bench_scale_recipes
uses at 10M tokens: the firing frequencies follow the Zipf law asked for, rows are the codes times the atoms."""

from __future__ import annotations

import numpy as np
import pytest

from actstore.testing.synthetic import firing_probabilities, planted_dictionary, zipf_codes


def test_firing_probabilities_follow_zipf_and_sum_to_the_mean():
    p = firing_probabilities(1000, 20, 0.7)
    assert p.sum() == pytest.approx(20) and p.max() <= 1.0
    assert p[9] / p[99] == pytest.approx((100 / 10) ** 0.7)  # untouched by the cap
    capped = firing_probabilities(10, 8, 2.0)  # the head would exceed 1: capped, the rest scaled up
    assert capped.max() == 1.0 and capped.sum() == pytest.approx(8)


def test_zipf_codes_fire_each_atom_at_its_rate():
    p = firing_probabilities(64, 6, 1.0)
    codes = np.concatenate(list(zipf_codes(p, seed=1, n=20_000, block=4096)))  # (n, 64)
    assert codes.shape == (20_000, 64)
    on = codes > 0
    np.testing.assert_allclose(on.mean(0), p, atol=0.015)
    assert ((codes[on] >= 0.5) & (codes[on] <= 1.5)).all()


def test_zipf_rows_are_codes_times_atoms_plus_noise():
    pd = planted_dictionary(16, 32, 4, seed=2, zipf=0.8, noise=0.0)
    rows = np.concatenate(list(pd.rows(3000, block=1000)))
    codes = np.concatenate(list(zipf_codes(firing_probabilities(32, 4, 0.8), 2, 3000, 1000)))
    np.testing.assert_allclose(rows, codes @ pd.atoms, rtol=1e-5, atol=1e-5)
    noisy = np.concatenate(
        list(planted_dictionary(16, 32, 4, seed=2, zipf=0.8, noise=0.1).rows(3000, block=1000))
    )
    assert np.std(noisy - rows) == pytest.approx(0.1, rel=0.05)
