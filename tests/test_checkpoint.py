"""Edit checkpoints on the tiny model: kill-and-resume equivalence, contents, mismatches."""

import json

import jax
import numpy as np
import pytest

from mech_unlearn_jax import checkpoint, edit
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import transformer

TINY = config_lib.get_preset("tiny-gemma3")
CONFIG = edit.EditConfig(
    num_steps=6, learning_rate=3e-2, forget_batch_size=4, maintain_batch_size=4,
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
  text = edit.TextBatch(
      tokens_BxL=rng.integers(3, TINY.vocab_size, (8, 10)).astype(np.int32),
      positions_BxL=np.tile(np.arange(10, dtype=np.int32), (8, 1)),
  )
  # Pools larger than a batch, so the data order matters for the result.
  return edit.EditData(forget=_facts(1, 6), maintain=_facts(2, 10), retain=text)


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
  return edit.train(tiny_model, _mask(), data, CONFIG, log_fn=None)


class Killed(Exception):
  pass


def test_killed_run_resumes_to_the_same_parameters(tiny_model, data, uninterrupted, tmp_path):
  batch_fn = edit.make_batch_fn(data, CONFIG)

  def dies_at_step_5(step):
    if step == 4:  # the fifth step: steps 1-4 are done and checkpointed at 2 and 4
      raise Killed()
    return batch_fn(step)

  with pytest.raises(Killed):
    edit.train(tiny_model, _mask(), dies_at_step_5, CONFIG, checkpoint_dir=str(tmp_path),
               model_spec="tiny", data_split=SPLIT, log_fn=None)
  with checkpoint.EditCheckpointManager(tmp_path) as manager:
    assert manager.all_steps() == [2, 4]

  logged = []
  resumed = edit.train(tiny_model, _mask(), data, CONFIG, checkpoint_dir=str(tmp_path),
                       model_spec="tiny", data_split=SPLIT, log_fn=lambda s, m: logged.append(s))
  assert logged == [5, 6]
  assert int(resumed.state.step) == 6
  for label, value in uninterrupted.state.params.items():
    np.testing.assert_allclose(resumed.state.params[label], value, rtol=0, atol=1e-6, err_msg=label)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
      resumed.state.opt_state, uninterrupted.state.opt_state,
  )
  with checkpoint.EditCheckpointManager(tmp_path) as manager:
    assert manager.all_steps() == [4, 6]  # train keeps the latest two by default
    meta = manager.restore_meta()
    mask = manager.restore_mask()
  assert meta["step"] == 6
  assert meta["model"]["spec"] == "tiny"
  assert meta["model"]["config"]["num_layers"] == TINY.num_layers
  assert edit.EditConfig.from_json(meta["edit_config"]) == CONFIG
  assert meta["data_split"] == json.loads(json.dumps(SPLIT))
  for label, m in _mask().items():
    np.testing.assert_array_equal(mask[label], m, err_msg=label)

  # The checkpoint holds trained leaves only; rebinding them reproduces the model.
  edited, _ = checkpoint.load_edited_model(tmp_path, base_model=tiny_model)
  got = transformer.parameters_by_label(edited)
  want = transformer.parameters_by_label(uninterrupted.model)
  for label in want:
    np.testing.assert_allclose(
        got[label].value.unwrap(*want[label].value.named_shape),
        want[label].value.unwrap(*want[label].value.named_shape), atol=1e-6, err_msg=label,
    )


def test_resume_refuses_a_different_run(tiny_model, data, tmp_path):
  config = CONFIG  # the same static config reuses the compiled step
  edit.train(tiny_model, _mask(), data, config, checkpoint_dir=str(tmp_path), log_fn=None)
  other_lr = edit.EditConfig(**{**config.to_json(), "learning_rate": 1e-3})
  with pytest.raises(checkpoint.CheckpointMismatchError, match="learning_rate"):
    edit.train(tiny_model, _mask(), data, other_lr, checkpoint_dir=str(tmp_path), log_fn=None)
  other_mask = dict(_mask(), **{"transformer/block_0/mlp/out_linear.weights": True})
  with pytest.raises(checkpoint.CheckpointMismatchError, match="block_0/mlp/out_linear"):
    edit.train(tiny_model, other_mask, data, config, checkpoint_dir=str(tmp_path), log_fn=None)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="data_split"):
    edit.train(tiny_model, _mask(), data, config, checkpoint_dir=str(tmp_path),
               data_split={"forget": "other"}, log_fn=None)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with checkpoint.EditCheckpointManager(tmp_path) as manager:
    assert manager.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      manager.restore_meta()
