"""The generic logistic-regression probe: learns linear structure, not noise; intervals."""

import numpy as np
import pytest

from mech_unlearn_jax import probes
from mech_unlearn_jax.evals.formats_eval import wilson_interval
from mech_unlearn_jax.localize import probes as localize_probes


def _features(seed, n_per_class=60, dim=12, classes=3, shift=4.0):
  """[2, N, dim]: layer 0 pure noise, layer 1 class means + noise (separable)."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(classes), n_per_class)
  means = rng.normal(size=(classes, dim)) * shift
  noise = rng.normal(size=(labels.size, dim))
  # A huge constant offset in one dimension: standardization must make it harmless.
  informative = noise + means[labels]
  informative[:, 0] += 1e4
  return np.stack([rng.normal(size=(labels.size, dim)), informative]), labels


def test_separable_features_give_perfect_held_out_accuracy():
  acts, labels = _features(0)
  result = probes.train_and_evaluate(acts, labels, 3, probes.ProbeConfig(seed=2))
  assert result.test_accuracy[1] >= 0.97
  assert result.test_accuracy[0] < 0.6  # noise layer near chance (1/3)
  lo, hi = result.test_interval[1]
  assert lo <= result.test_accuracy[1] <= hi and lo > 1 / 3


def test_shuffled_labels_give_chance_accuracy():
  acts, labels = _features(1, n_per_class=100)
  shuffled = np.random.default_rng(5).permutation(labels)
  result = probes.train_and_evaluate(acts, shuffled, 3, probes.ProbeConfig(seed=0))
  assert np.all(np.abs(result.test_accuracy - 1 / 3) < 0.15)
  # The 95% interval of a chance-level probe covers chance.
  assert np.all(result.test_interval[:, 0] < 1 / 3 + 0.02)


def test_fit_is_deterministic_and_split_is_seeded():
  acts, labels = _features(2)
  a = probes.fit_probes(acts, labels, 3)
  b = probes.fit_probes(acts, labels, 3)
  np.testing.assert_array_equal(np.asarray(a.weights_LxDxC), np.asarray(b.weights_LxDxC))
  r1 = probes.train_and_evaluate(acts, labels, 3, probes.ProbeConfig(seed=1))
  r2 = probes.train_and_evaluate(acts, labels, 3, probes.ProbeConfig(seed=9))
  assert not np.array_equal(r1.test_index, r2.test_index)
  assert set(r1.test_index) | set(r1.train_index) == set(range(labels.size))


def test_accuracy_with_interval_matches_wilson():
  preds = np.array([[0, 1, 1, 2], [0, 0, 0, 0]])
  labels = np.array([0, 1, 2, 2])
  acc, interval = probes.accuracy_with_interval(preds, labels)
  np.testing.assert_allclose(acc, [0.75, 0.25])
  np.testing.assert_allclose(interval[0], wilson_interval(3, 4))
  acc, interval = probes.accuracy_with_interval(np.zeros((2, 0), int), np.zeros(0, int))
  assert np.isnan(acc).all() and (interval == [0.0, 1.0]).all()


def test_bad_inputs_are_rejected():
  acts, labels = _features(3)
  with pytest.raises(ValueError, match="0..1"):
    probes.fit_probes(acts, labels, 2)
  with pytest.raises(ValueError, match="shape"):
    probes.fit_probes(acts[:, :5], labels, 3)
  with pytest.raises(ValueError, match="steps"):
    probes.ProbeConfig(steps=0)


def test_fact_lookup_module_reuses_the_generic_probe():
  assert localize_probes.ProbeConfig is probes.ProbeConfig
  assert localize_probes.train_and_evaluate is probes.train_and_evaluate
  result = probes.train_and_evaluate(*_features(4), 3)
  assert "test_interval95" in result.to_json() and len(result.to_json()["test_accuracy"]) == 2
