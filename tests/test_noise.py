"""Synthetic label noise: exact rates, every flip changes the class, seeded."""

import numpy as np
import pytest

from training.noise import asymmetric_noise, inject, parse_noise, uniform_noise


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.6, 0.8])
def test_uniform_noise_flips_exactly_rate_n_to_other_classes(rate):
    labels = np.repeat(np.arange(8), 125)
    noisy = uniform_noise(labels, rate, 8, seed=3)
    assert (noisy != labels).sum() == round(rate * len(labels))
    assert set(np.unique(noisy)) <= set(range(8))
    if rate:
        flipped = noisy[noisy != labels]
        assert len(np.unique(flipped)) == 8  # wrong labels spread over all classes


def test_uniform_noise_is_seeded():
    labels = np.repeat(np.arange(5), 40)
    assert np.array_equal(uniform_noise(labels, 0.4, 5, 1), uniform_noise(labels, 0.4, 5, 1))
    assert not np.array_equal(uniform_noise(labels, 0.4, 5, 1), uniform_noise(labels, 0.4, 5, 2))


def test_asymmetric_noise_flips_each_class_to_the_next():
    labels = np.repeat(np.arange(4), 50)
    noisy = asymmetric_noise(labels, 0.4, 4, seed=0)
    for c in range(4):
        moved = noisy[(labels == c) & (noisy != labels)]
        assert len(moved) == 20 and set(moved) == {(c + 1) % 4}


def test_parse_noise_rejects_bad_specs():
    assert parse_noise("uniform:0.4") == ("uniform", 0.4)
    assert parse_noise(None) is None
    for bad in ["gaussian:0.1", "uniform:abc", "uniform:1.2"]:
        with pytest.raises(ValueError):
            parse_noise(bad)
    assert np.array_equal(inject(np.arange(4), None, 4, 0), np.arange(4))
