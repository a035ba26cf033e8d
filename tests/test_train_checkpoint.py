"""Training checkpoints on the tiny model: kill-and-resume equivalence with the full
history, contents, mismatches, non-finite stops that keep the last good checkpoint."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.train import checkpoint
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import transformer

TINY = config_lib.get_preset("tiny-gemma3")
CONFIG = train_lib.EditConfig(
    steps=6, lr=3e-2, forget_batch_size=4, maintain_batch_size=4,
    retain_batch_size=4, num_microbatches=2, checkpoint_every=2, seed=3,
)
SPLIT = {"forget": "first_4", "maintain_rows": [1, 2, 3]}


def _facts(seed, n, length=8):
  rng = np.random.default_rng(seed)
  return FactBatch(
      tokens_BxL=rng.integers(3, TINY.vocab_size, (n, length)).astype(np.int32),
      positions_BxL=np.tile(np.arange(length, dtype=np.int32), (n, 1)),
      answer_ids_B=rng.integers(3, TINY.vocab_size, n).astype(np.int32),
      wrong_ids_BxK=np.full((n, 1), -1, np.int32),
      subject_mask_BxL=np.zeros((n, length), bool),
  )


@pytest.fixture(scope="module")
def tiny_model():
  return transformer.build_transformer(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(9)
  text = train_lib.TextBatch(
      tokens_BxL=rng.integers(3, TINY.vocab_size, (8, 10)).astype(np.int32),
      positions_BxL=np.tile(np.arange(10, dtype=np.int32), (8, 1)),
  )
  # Pools larger than a batch, so the data order matters for the result.
  return train_lib.EditData(forget=_facts(1, 6), maintain=_facts(2, 10), retain=text)


def _mask():
  shapes = transformer.parameter_shapes(TINY)
  mask = {label: ("/mlp/" in label and "block_1/" in label) for label in shapes}
  # A sub-tensor mask too, so bool arrays go through the checkpoint.
  label = "transformer/block_2/attention/output.weights"
  partial = np.zeros(tuple(shapes[label].values()), bool)
  partial.reshape(-1)[::3] = True
  mask[label] = partial
  return mask


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, data):
  return train_lib.edit(tiny_model, _mask(), data, CONFIG, log_fn=None)


class Killed(Exception):
  pass


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_killed_run_resumes_to_the_same_parameters_and_history(
    tiny_model, data, uninterrupted, tmp_path
):
  batch_fn = train_lib.make_batch_fn(data, CONFIG)

  def dies_at_step_5(step):
    if step == 4:  # the fifth step: steps 1-4 are done and checkpointed at 2 and 4
      raise Killed()
    return batch_fn(step)

  with pytest.raises(Killed):
    train_lib.edit(tiny_model, _mask(), dies_at_step_5, CONFIG, checkpoint_dir=str(tmp_path),
                   model_spec="tiny", data_split=SPLIT, log_fn=None)
  with checkpoint.CheckpointManager(tmp_path) as manager:
    assert manager.all_steps() == [2, 4]
    assert [h["step"] for h in manager.restore_history(2)] == [1, 2]
    assert [h["step"] for h in manager.restore_history()] == [1, 2, 3, 4]

  logged = []
  resumed = train_lib.edit(tiny_model, _mask(), data, CONFIG, checkpoint_dir=str(tmp_path),
                           model_spec="tiny", data_split=SPLIT,
                           log_fn=lambda s, m: logged.append(s))
  assert logged == [5, 6]
  assert int(resumed.state.step) == 6
  # Bit-equal to the uninterrupted run: the same steps on the same data.
  _assert_trees_equal(resumed.state.params, uninterrupted.state.params)
  _assert_trees_equal(resumed.state.opt_state, uninterrupted.state.opt_state)
  # The full history, also bit-equal (JSON round-trips floats exactly).
  assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
  assert resumed.history == uninterrupted.history
  with checkpoint.CheckpointManager(tmp_path) as manager:
    assert manager.all_steps() == [4, 6]  # train keeps the latest two by default
    meta = manager.restore_meta()
    update_mask = manager.restore_mask()
    assert manager.restore_history() == uninterrupted.history
  assert meta["step"] == 6
  assert meta["model"]["spec"] == "tiny"
  assert meta["model"]["config"]["num_layers"] == TINY.num_layers
  assert train_lib.EditConfig.from_json(meta["config"]) == CONFIG
  assert meta["data_split"] == json.loads(json.dumps(SPLIT))
  assert meta["trainable"] == {"kind": "mask"}
  # Trained labels are the params; the update mask covers them (0-d for whole ones).
  assert sorted(meta["params"]) == sorted(k for k, v in _mask().items() if np.any(v))
  assert sorted(update_mask) == sorted(meta["params"])
  restored_mask = checkpoint.param_mask_from_checkpoint(meta, update_mask, tiny_model)
  for label, m in _mask().items():
    np.testing.assert_array_equal(restored_mask[label], m, err_msg=label)

  # The checkpoint holds trained leaves only; rebinding them reproduces the model.
  edited, _ = checkpoint.load_trained_model(tmp_path, base_model=tiny_model)
  got = transformer.parameters_by_label(edited)
  want = transformer.parameters_by_label(uninterrupted.model)
  assert set(got) == set(want)
  for label in want:
    np.testing.assert_array_equal(
        got[label].value.unwrap(*want[label].value.named_shape),
        want[label].value.unwrap(*want[label].value.named_shape), err_msg=label,
    )


def test_an_interrupt_dropped_by_python_stops_before_the_next_step_and_resumes(
    tiny_model, data, uninterrupted, tmp_path
):
  # A signal's KeyboardInterrupt lost inside a gc callback leaves only the request.
  from mech_unlearn_jax import progress

  def request_after_step_4(step, metrics):
    del metrics
    if step == 4:
      progress.request_interrupt("signal 15")

  with pytest.raises(KeyboardInterrupt, match="signal 15"):
    train_lib.edit(tiny_model, _mask(), data, CONFIG, checkpoint_dir=str(tmp_path),
                   model_spec="tiny", data_split=SPLIT, log_fn=request_after_step_4)
  assert progress.interrupt_requested() == ""
  with checkpoint.CheckpointManager(tmp_path) as manager:
    assert manager.all_steps() == [2, 4]  # stopped before step 5
  resumed = train_lib.edit(tiny_model, _mask(), data, CONFIG, checkpoint_dir=str(tmp_path),
                           model_spec="tiny", data_split=SPLIT, log_fn=None)
  _assert_trees_equal(resumed.state.params, uninterrupted.state.params)


def test_a_finished_run_resumes_without_training(tiny_model, data, uninterrupted, tmp_path):
  train_lib.edit(tiny_model, _mask(), data, CONFIG, checkpoint_dir=str(tmp_path), log_fn=None)
  logged = []
  again = train_lib.edit(tiny_model, _mask(), data, CONFIG, checkpoint_dir=str(tmp_path),
                         log_fn=lambda s, m: logged.append(s))
  assert logged == []
  assert again.history == uninterrupted.history
  _assert_trees_equal(again.params, uninterrupted.params)


def test_resume_refuses_a_different_run(tiny_model, data, tmp_path):
  config = CONFIG  # the same static config reuses the compiled step
  train_lib.edit(tiny_model, _mask(), data, config, checkpoint_dir=str(tmp_path), log_fn=None)
  other_lr = train_lib.EditConfig(**{**config.to_json(), "lr": 1e-3})
  with pytest.raises(checkpoint.CheckpointMismatchError, match="lr"):
    train_lib.edit(tiny_model, _mask(), data, other_lr, checkpoint_dir=str(tmp_path), log_fn=None)
  other_mask = dict(_mask(), **{"transformer/block_0/mlp/out_linear.weights": True})
  with pytest.raises(checkpoint.CheckpointMismatchError, match="block_0/mlp/out_linear"):
    train_lib.edit(tiny_model, other_mask, data, config, checkpoint_dir=str(tmp_path), log_fn=None)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="data_split"):
    train_lib.edit(tiny_model, _mask(), data, config, checkpoint_dir=str(tmp_path),
                   data_split={"forget": "other"}, log_fn=None)
  # Same labels, another sub-tensor mask: only the update mask tells them apart.
  label = "transformer/block_2/attention/output.weights"
  shifted = dict(_mask(), **{label: np.roll(_mask()[label], 1)})
  with pytest.raises(checkpoint.CheckpointMismatchError, match="update mask.*block_2/attention/output"):
    train_lib.edit(tiny_model, shifted, data, config, checkpoint_dir=str(tmp_path), log_fn=None)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with checkpoint.CheckpointManager(tmp_path) as manager:
    assert manager.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      manager.restore_meta()


def _nan_at(batch_fn, bad_step):
  """Batches of `batch_fn`, except step `bad_step`: an answer id outside the vocabulary
  (JAX's gather fills NaN), i.e. a NaN forget loss with finite gradients."""

  def fn(step):
    batch = batch_fn(step)
    if step != bad_step:
      return batch
    ids = np.array(batch.forget.answer_ids_B)
    ids[0, 0] = TINY.vocab_size + 7
    return dataclasses.replace(batch, forget=dataclasses.replace(batch.forget, answer_ids_B=ids))

  return fn


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_model, data, uninterrupted, tmp_path
):
  config = dataclasses.replace(CONFIG, checkpoint_every=1)
  fn = _nan_at(train_lib.make_batch_fn(data, config), bad_step=3)  # the fourth step
  logged = []
  with pytest.raises(train_lib.NonFiniteError, match=r"edit step 4: non-finite forget_loss") as info:
    train_lib.edit(tiny_model, _mask(), fn, config, checkpoint_dir=str(tmp_path),
                   log_fn=lambda s, m: logged.append(s), max_checkpoints_to_keep=None)
  assert info.value.step == 4 and info.value.term == "forget_loss"
  assert "last good checkpoint: step 3" in str(info.value)
  assert logged == [1, 2, 3]
  with checkpoint.CheckpointManager(tmp_path) as manager:
    assert manager.all_steps() == [1, 2, 3]
    assert [h["step"] for h in manager.restore_history()] == [1, 2, 3]
  # The good checkpoint is the uninterrupted run's step 3 (same data up to there).
  resumed = train_lib.edit(tiny_model, _mask(), data, config, checkpoint_dir=str(tmp_path),
                           log_fn=None, max_checkpoints_to_keep=None)
  assert resumed.history[:3] == uninterrupted.history[:3]
  assert [h["step"] for h in resumed.history] == list(range(1, CONFIG.steps + 1))


def test_infinite_learning_rate_raises_before_anything_is_saved(tiny_model, data, tmp_path):
  config = dataclasses.replace(CONFIG, lr=float("inf"), checkpoint_every=1)
  with pytest.raises(train_lib.NonFiniteError, match=r"edit step 1: non-finite update_norm") as info:
    train_lib.edit(tiny_model, _mask(), data, config, checkpoint_dir=str(tmp_path), log_fn=None)
  assert "last good checkpoint: none" in str(info.value)
  with checkpoint.CheckpointManager(tmp_path) as manager:
    assert manager.all_steps() == []
