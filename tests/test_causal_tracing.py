"""Causal tracing: the batched implementation against a one-restoration-per-forward loop."""

import jax
import numpy as np
import pytest

from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.localize import causal_tracing as ct
from mech_unlearn_jax.models.config import get_preset
from mech_unlearn_jax.models.forward import left_pad
from mech_unlearn_jax.models.transformer import build_transformer

CONFIG = get_preset("tiny-gemma3")
LENGTHS = (9, 12, 7, 11)


@pytest.fixture(scope="module")
def model():
  return build_transformer(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  tokens, positions = left_pad([rng.integers(3, CONFIG.vocab_size, n).tolist() for n in LENGTHS])
  subject = np.zeros_like(tokens, bool)
  for row, n in enumerate(LENGTHS):
    start = tokens.shape[1] - n + 3
    subject[row, start : start + 1 + row % 2] = True
  return FactBatch(
      tokens_BxL=tokens, positions_BxL=positions, answer_ids_B=np.array([5, 6, 5, 8]),
      wrong_ids_BxK=np.array([[9, 10], [11, -1], [12, 13], [14, 15]]), subject_mask_BxL=subject,
  )


def assert_same(a: ct.CTResult, b: ct.CTResult):
  np.testing.assert_allclose(a.q_clean_B, b.q_clean_B, rtol=1e-5)
  np.testing.assert_allclose(a.q_corrupt_B, b.q_corrupt_B, rtol=1e-4)
  np.testing.assert_allclose(a.q_mlp_B, b.q_mlp_B, rtol=1e-4)
  np.testing.assert_allclose(a.q_heads_B, b.q_heads_B, rtol=1e-4)
  np.testing.assert_allclose(a.mlp, b.mlp, rtol=1e-3, atol=2e-4)
  np.testing.assert_allclose(a.heads, b.heads, rtol=1e-3, atol=2e-4)


def test_batched_equals_unbatched_all_positions(model, batch):
  config = ct.CTConfig(num_samples=2, noise_scale=20.0, prompts_per_call=3)
  batched = ct.causal_tracing(model, batch, config)
  assert batched.mlp.shape == (3,) and batched.heads.shape == (3, 4)
  # The corruption matters and restorations move probabilities (the test can fail).
  assert np.abs(batched.q_corrupt_B - batched.q_clean_B).max() > 1e-4
  assert np.abs(batched.q_heads_B - batched.q_corrupt_B[:, None, None]).max() > 1e-5
  assert_same(batched, ct.causal_tracing_unbatched(model, batch, config))
  # Computing every column instead of reusing the clean prefix changes nothing.
  full = ct.causal_tracing(model, batch, ct.CTConfig(num_samples=2, noise_scale=20.0, reuse_prefix=False))
  assert_same(batched, full)
  scores = batched.scores()
  assert scores[iv.Site(1, "mlp_out")] == batched.mlp[1]
  np.testing.assert_array_equal(scores[iv.Site(2, "head_out")], batched.heads[2])


def test_batched_equals_unbatched_per_position_reference_options(model, batch):
  config = ct.CTConfig(
      num_samples=1, per_position=True, recovery="reference", noise="reference",
      sigma_from="subjects", seed=3,
  )
  batched = ct.causal_tracing(model, batch, config)
  width = batch.tokens_BxL.shape[1]
  assert batched.mlp.shape == (3, width) and batched.heads.shape == (3, 4, width)
  assert_same(batched, ct.causal_tracing_unbatched(model, batch, config))
  # Columns before the first subject token are exact no-ops.
  first = int(batch.subject_mask_BxL.any(0).argmax())
  assert first > 0
  np.testing.assert_array_equal(batched.mlp[:, :first], 0)
  assert dict(batched.named()["heads"].named_shape) == {"layers": 3, "heads_flat": 4, "seq": width}


def test_noise_scale_and_recovery_modes(model, batch):
  table = np.asarray(ct.embedding_table(model).untag("vocabulary", "embedding").unwrap())
  sigma = table.std()
  rome = ct.noise_std(model, batch, ct.CTConfig())
  reference = ct.noise_std(model, batch, ct.CTConfig(noise="reference"))
  assert rome == pytest.approx(3 * sigma, rel=1e-5)
  assert reference == pytest.approx(np.sqrt(3 * sigma), rel=1e-5)
  ids = ct._prob_ids(batch, ct.CTConfig(recovery="reference"), batch.answer_ids_B)
  assert ids.shape == (4, 4) and (ids == batch.answer_ids_B).all()
  noise = ct.subject_noise(0, np.array([2, 5]), 3, 4, 2)
  again = ct.subject_noise(0, np.array([5]), 3, 4, 2)
  np.testing.assert_array_equal(noise[:, 1], again[:, 0])


def test_bad_config_and_hooked_model(model, batch):
  with pytest.raises(ValueError, match="noise"):
    ct.CTConfig(noise="sqrt")
  with pytest.raises(ValueError, match="at least one"):
    ct.CTConfig(heads=False, mlps=False)
  hooked = iv.with_captures(model, [iv.Site(0, "mlp_out")])
  with pytest.raises(ValueError, match="without intervention hooks"):
    ct.causal_tracing(hooked, batch)
  empty = FactBatch(batch.tokens_BxL, batch.positions_BxL, batch.answer_ids_B, batch.wrong_ids_BxK,
                    np.zeros_like(batch.subject_mask_BxL))
  with pytest.raises(ValueError, match="no subject tokens"):
    ct.causal_tracing(model, empty)
