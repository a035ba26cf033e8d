"""Latent-knowledge probes on a tiny random model: capture, separable/shuffled labels."""

import jax
import numpy as np
import pytest

from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.evals import latent
from mech_unlearn_jax.localize import probes as localize_probes
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import transformer
from mech_unlearn_jax.probes import ProbeConfig

TINY = config_lib.get_preset("tiny-gemma3")
CLASS_TOKENS = np.array([10, 11, 12])


def class_batch(seed: int, labels, length: int = 7) -> FactBatch:
  """Random prompts (some left-padded) whose LAST token is CLASS_TOKENS[label]."""
  rng = np.random.default_rng(seed)
  n = len(labels)
  tokens = rng.integers(20, TINY.vocab_size, (n, length)).astype(np.int32)
  tokens[:, 0] = 2  # BOS
  positions = np.tile(np.arange(length, dtype=np.int32), (n, 1))
  for row in range(0, n, 3):  # every third row padded by 2
    tokens[row, 2:] = tokens[row, : length - 2].copy()
    tokens[row, :2] = 0
    positions[row] = np.arange(length) - 2
    positions[row, :2] = -1
  tokens[:, -1] = CLASS_TOKENS[np.asarray(labels)]
  return FactBatch(
      tokens_BxL=tokens,
      positions_BxL=positions,
      answer_ids_B=np.zeros(n, np.int32),
      wrong_ids_BxK=np.full((n, 1), -1, np.int32),
      subject_mask_BxL=np.zeros_like(tokens, bool),
  )


@pytest.fixture(scope="module")
def tiny_model():
  return transformer.build_transformer(TINY, jax.random.key(0))


def test_capture_equals_a_manual_forward(tiny_model):
  batch = class_batch(0, [0, 1, 2, 0, 1])
  # Chunk of 2 rows: exercises chunking and the padded last chunk.
  acts = latent.last_token_residuals(tiny_model, batch, chunk_size=2)
  assert acts.shape == (TINY.num_layers + 1, batch.size, TINY.embedding_dim)
  manual = localize_probes.residuals_by_layer(tiny_model, batch.tokens_BxL, batch.positions_BxL)
  for layer, x in enumerate(manual):
    want = np.asarray(x.untag("batch", "seq", "embedding").unwrap())[:, -1]
    np.testing.assert_allclose(acts[layer], want, rtol=1e-5, atol=1e-5)


def _eval(model, train_labels, base_model=None, edit_labels="shifted"):
  rng = np.random.default_rng(0)
  train_y = np.asarray(train_labels)
  heldout_y = rng.integers(0, 3, 30)
  forget_y = rng.integers(0, 3, 24)
  edit_y = (forget_y + 1) % 3 if isinstance(edit_labels, str) else edit_labels
  return latent.latent_probe_eval(
      model,
      class_batch(1, np.arange(60) % 3), train_y,
      class_batch(2, heldout_y), heldout_y,
      class_batch(3, forget_y), forget_y, edit_y,
      num_classes=3,
      config=latent.LatentProbeConfig(probe=ProbeConfig(steps=200), chunk_size=32),
      base_model=base_model,
  )


def test_decodable_class_gives_perfect_probes(tiny_model):
  result = _eval(tiny_model, np.arange(60) % 3, base_model=tiny_model)
  r = result.retrained
  # The class token sits at the probed position: the embedding decodes it exactly and
  # later layers (which mix in the random context) nearly so.
  assert r.heldout_accuracy.shape == (TINY.num_layers + 1,)
  assert r.heldout_accuracy[0] == 1.0 and r.forget_true_accuracy[0] == 1.0
  assert np.all(r.heldout_accuracy >= 0.8) and np.all(r.forget_true_accuracy >= 0.8)
  assert np.all(r.forget_edit_accuracy <= 0.2)
  # The same model as base: transfer probes are the retrained ones.
  np.testing.assert_allclose(result.transfer.forget_true_accuracy, r.forget_true_accuracy)
  out = result.to_json()
  assert out["layers"][0] == "embedding" and len(out["layers"]) == TINY.num_layers + 1
  assert out["retrained"]["summary"]["forget_true_max"] == 1.0
  assert out["transfer"]["num_forget_edit"] == 24


def test_shuffled_labels_give_chance(tiny_model):
  # Labels independent of the prompts, in training and held out: nothing to learn.
  rng = np.random.default_rng(7)
  heldout_tokens, heldout_y = rng.integers(0, 3, 90), rng.integers(0, 3, 90)
  result = latent.latent_probe_eval(
      tiny_model,
      class_batch(1, np.arange(60) % 3), rng.permutation(np.arange(60) % 3),
      class_batch(2, heldout_tokens), heldout_y,
      class_batch(3, [0, 1, 2]), [0, 1, 2], None,
      num_classes=3,
      config=latent.LatentProbeConfig(probe=ProbeConfig(steps=200), chunk_size=32),
  )
  acc = result.retrained.heldout_accuracy
  assert np.all(acc < 0.6) and abs(float(acc.mean()) - 1 / 3) < 0.15
  assert result.retrained.forget_edit_accuracy is None


def test_edit_targets_outside_the_classes_are_left_out(tiny_model):
  forget_y_edit = np.full(24, -1)
  forget_y_edit[:4] = 0
  r = _eval(tiny_model, np.arange(60) % 3, edit_labels=forget_y_edit).retrained
  assert r.num_forget_edit == 4
  none = _eval(tiny_model, np.arange(60) % 3, edit_labels=np.full(24, -1)).retrained
  assert none.forget_edit_accuracy is None and none.to_json()["forget_edit_accuracy"] is None
  with pytest.raises(ValueError, match="forget_true_labels"):
    latent.latent_probe_eval(
        tiny_model, class_batch(1, [0, 1]), [0, 1], class_batch(2, [0]), [0],
        class_batch(3, [0, 1]), [0, 5], None, num_classes=3,
    )


def test_forget_rows_of_a_class_the_probes_never_saw_are_left_out(tiny_model):
  # Trained on classes 0 and 1 only (class 0 twice as often); the forget facts are of
  # class 2 (a whole-sport edit's sport, absent from the maintain facts) and class 1.
  train_y = np.array([0, 0, 1] * 20)
  forget_y = np.array([2] * 6 + [1] * 4)
  edit_y = np.array([0] * 6 + [2] * 4)  # class 2 targets: never seen either
  result = latent.latent_probe_eval(
      tiny_model,
      class_batch(1, train_y), train_y,
      class_batch(2, [0, 1, 0, 1]), [0, 1, 0, 1],
      class_batch(3, forget_y), forget_y, edit_y,
      num_classes=3,
      config=latent.LatentProbeConfig(probe=ProbeConfig(steps=200), chunk_size=32),
  )
  r = result.retrained
  # Only the 4 class-1 rows count toward the true accuracy (decodable: 1.0 at the
  # embedding), not the 6 class-2 rows a probe cannot predict (they would give 0.6 x 0).
  assert (r.num_forget_true, r.num_forget_edit) == (4, 6)
  assert r.forget_true_accuracy[0] == 1.0 and r.forget_edit_accuracy[0] == 0.0
  # The class prior (always class 0) on the same rows: 0 of the true rows, all edit rows.
  assert (result.prior_true, result.prior_edit) == (0.0, 1.0)
  out = result.to_json()
  assert out["retrained"]["num_forget_true"] == 4 and out["prior_true"] == 0.0
  # Held-out maintain rows likewise: a class-2 row cannot count against the probe.
  mixed = latent.latent_probe_eval(
      tiny_model, class_batch(1, train_y), train_y, class_batch(2, [0, 1, 2, 2, 2, 2]), [0, 1, 2, 2, 2, 2],
      class_batch(3, forget_y), forget_y, None, num_classes=3,
      config=latent.LatentProbeConfig(probe=ProbeConfig(steps=200), chunk_size=32),
  )
  assert mixed.retrained.num_heldout == 2 and mixed.retrained.heldout_accuracy[0] == 1.0
  assert mixed.to_json()["retrained"]["num_heldout"] == 2
  # No forget row of a seen class: no true accuracy at all (not a 0).
  none = latent.latent_probe_eval(
      tiny_model, class_batch(1, train_y), train_y, class_batch(2, [0, 1]), [0, 1],
      class_batch(3, [2, 2]), [2, 2], None, num_classes=3,
      config=latent.LatentProbeConfig(probe=ProbeConfig(steps=50), chunk_size=32),
  )
  assert none.retrained.forget_true_accuracy is None and none.prior_true is None
  assert none.to_json()["retrained"]["forget_true_accuracy"] is None


def test_probe_results_of_another_protocol_are_recomputed(tmp_path):
  from mech_unlearn_jax import io
  from mech_unlearn_jax.experiment import robustness

  path = tmp_path / "probes.json"
  current = lambda out: out.get("protocol") == latent.PROBE_PROTOCOL
  calls = []

  def compute():
    calls.append(1)
    return {"protocol": latent.PROBE_PROTOCOL, "value": len(calls)}

  io.write_json(path, {"value": 0})  # written before results carried their protocol
  assert robustness._staged(path, compute, current)["value"] == 1
  assert robustness._staged(path, compute, current)["value"] == 1 and len(calls) == 1  # read back
  assert io.read_json(path)["protocol"] == latent.PROBE_PROTOCOL
