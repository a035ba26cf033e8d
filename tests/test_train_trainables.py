"""Trainables on the tiny random model: the one mask validator, LoRA, projection, callbacks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.localize import baselines
from mech_unlearn_jax.localize import masks as masks_lib
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import forward, transformer
from mech_unlearn_jax.train import checkpoint
from mech_unlearn_jax.train.trainables import LowRankAdapter

TINY = config_lib.get_preset("tiny-gemma3")  # d=32, 4 query heads in 2 KV groups, head_dim 8, mlp 64
EMBEDDER = "transformer/embedder.embeddings"


def _facts(seed: int, n: int, length: int = 8) -> FactBatch:
  rng = np.random.default_rng(seed)
  return FactBatch(
      tokens_BxL=rng.integers(3, TINY.vocab_size, (n, length)).astype(np.int32),
      positions_BxL=np.tile(np.arange(length, dtype=np.int32), (n, 1)),
      answer_ids_B=rng.integers(3, TINY.vocab_size, n).astype(np.int32),
      wrong_ids_BxK=np.full((n, 1), -1, np.int32),
      subject_mask_BxL=np.zeros((n, length), bool),
  )


def _values(model) -> dict[str, np.ndarray]:
  return {
      label: np.asarray(p.value.unwrap(*p.value.named_shape))
      for label, p in transformer.parameters_by_label(model).items()
  }


@pytest.fixture(scope="module")
def tiny_model():
  return transformer.build_transformer(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(4)
  text = train_lib.TextBatch(
      tokens_BxL=rng.integers(3, TINY.vocab_size, (4, 10)).astype(np.int32),
      positions_BxL=np.tile(np.arange(10, dtype=np.int32), (4, 1)),
  )
  return train_lib.EditData(forget=_facts(1, 4), maintain=_facts(2, 4), retain=text)


CONFIG = train_lib.EditConfig(
    steps=3, lr=5e-2, forget_batch_size=4, maintain_batch_size=4,
    retain_batch_size=4,
)
TOKENS, POSITIONS = forward.left_pad([[2, 5, 6, 7, 8, 9], [2, 9, 10, 11]], length=7)


# ----------------------------------------------------------------------------------
# The one validator.


def test_block_matrices_are_the_localization_masks_editable_labels(tiny_model):
  for layout in (TINY, tiny_model):
    labels = train_lib.block_matrix_labels(layout)
    assert sorted(labels) == sorted(masks_lib.editable_labels(TINY))
    assert len(labels) == 7 * TINY.num_layers
  assert train_lib.block_weights_mask(tiny_model) == baselines.nonlocalized(TINY).mask
  assert train_lib.block_weights_mask(TINY) == baselines.nonlocalized(TINY).mask


def test_trainer_and_localization_masks_share_one_validator(tiny_model):
  assert masks_lib.MaskError is train_lib.MaskError
  assert issubclass(train_lib.MaskError, ValueError)
  embed = dict(masks_lib.empty_mask(TINY), **{EMBEDDER: True})
  # Both refuse to train the embedding table, for a config or a model layout.
  with pytest.raises(train_lib.MaskError, match="embedder.*only attention and MLP"):
    masks_lib.validate_mask(embed, TINY)
  with pytest.raises(train_lib.MaskError, match="embedder.*only attention and MLP"):
    train_lib.mask_trainable(tiny_model, embed)
  # And both accept a sub-tensor neuron mask, validated in the model's own layout.
  neurons = masks_lib.mask_from_neurons(tiny_model, {1: [0, 3]})
  masks_lib.validate_mask(neurons, tiny_model)
  normalized = train_lib.validate_mask(neurons, tiny_model)
  label = masks_lib.matrix_label(1, "out_linear")
  assert normalized[label].shape == neurons[label].shape
  assert normalized[EMBEDDER].shape == () and not normalized[EMBEDDER]
  with pytest.raises(train_lib.MaskError, match="mask entry must be a bool"):
    train_lib.validate_mask(dict(neurons, **{label: [True]}), tiny_model)
  with pytest.raises(train_lib.MaskError, match="dtype int"):
    train_lib.validate_mask(dict(neurons, **{label: np.zeros(neurons[label].shape, int)}), tiny_model)


# ----------------------------------------------------------------------------------
# LoRA.


@jax.jit
def _logits(params, trainable, tokens, positions):
  return forward.full_logits(trainable.bind(params), tokens, positions)


def test_lora_initial_model_is_exactly_the_base_model(tiny_model):
  params, trainable, update_mask = train_lib.lora_trainable(tiny_model, rank=4, alpha=8.0, seed=0)
  assert update_mask is None
  # Bitwise, block by block (a scan over the blocks compiles each model's loop
  # body on its own, which may round differently).
  unscanned = lambda model: transformer.with_block_scan(model, False)
  base = forward.full_logits(unscanned(tiny_model), TOKENS, POSITIONS)
  np.testing.assert_array_equal(forward.full_logits(unscanned(trainable.bind(params)), TOKENS, POSITIONS), base)
  np.testing.assert_array_equal(forward.full_logits(unscanned(trainable.merge(params)), TOKENS, POSITIONS), base)
  # Jitted, XLA fuses the extra (zero) branch differently: equal to float32 rounding.
  mask_params, mask_trainable, _ = train_lib.mask_trainable(
      tiny_model, train_lib.block_weights_mask(tiny_model)
  )
  np.testing.assert_allclose(
      _logits(params, trainable, TOKENS, POSITIONS),
      _logits(mask_params, mask_trainable, TOKENS, POSITIONS), rtol=0, atol=1e-5,
  )
  # A is random (not a degenerate adapter), B is zero.
  for info in trainable.adapters:
    assert np.std(np.asarray(params[info.a_label])) > 0
    assert not np.any(np.asarray(params[info.b_label]))


def test_lora_rank_is_capped_by_the_smaller_side(tiny_model):
  params, trainable, _ = train_lib.lora_trainable(tiny_model, rank=24, alpha=12.0, seed=1)
  ranks = trainable.effective_ranks
  assert len(ranks) == 7 * TINY.num_layers
  # d = 32; query/output 32 x 32; key/value 32 x (2 KV heads * 8); MLP 32 x 64.
  want = {"query": 24, "key": 16, "value": 16, "output": 24,
          "gating_linear": 24, "value_linear": 24, "out_linear": 24}
  for info in trainable.adapters:
    name = info.label.rsplit("/", 1)[1].removesuffix(".weights")
    assert info.rank == want[name], info.label
    assert info.scale == pytest.approx(12.0 / want[name])
    axes = dict(trainable.param_axes)
    assert params[info.a_label].shape[axes[info.a_label].index("lowrank")] == info.rank
    assert params[info.b_label].shape[axes[info.b_label].index("lowrank")] == info.rank
  spec = trainable.spec()
  assert spec["kind"] == "lora" and spec["rank"] == 24 and spec["effective_ranks"] == ranks
  # Parameters: sum over matrices of r * (in + out).
  assert train_lib.count_parameters(params) == TINY.num_layers * (
      24 * (32 + 32) + 16 * (32 + 16) * 2 + 24 * (32 + 32) + 3 * 24 * (32 + 64)
  )


def test_lora_targets(tiny_model):
  _, trainable, _ = train_lib.lora_trainable(tiny_model, rank=2, alpha=2.0, seed=0, targets=("q", "down"))
  names = {info.label.rsplit("/", 1)[1] for info in trainable.adapters}
  assert names == {"query.weights", "out_linear.weights"}
  assert trainable.targets == ("query", "out_linear")
  with pytest.raises(ValueError, match="unknown LoRA target 'mlp'"):
    train_lib.lora_trainable(tiny_model, rank=2, alpha=2.0, seed=0, targets=("mlp",))
  with pytest.raises(ValueError, match="rank"):
    train_lib.lora_trainable(tiny_model, rank=0, alpha=2.0, seed=0)


def test_lora_folded_and_factored_forms_agree_in_value_and_gradient(tiny_model):
  params, _, _ = train_lib.lora_trainable(tiny_model, rank=6, alpha=6.0, seed=3)
  # Non-zero B, so the adapters change the function and A gets a gradient.
  params = {
      k: (0.1 * jax.random.normal(jax.random.key(7), v.shape) if k.endswith("lora_b.weights") else v)
      for k, v in params.items()
  }

  def loss_and_grad(mode):
    _, trainable, _ = train_lib.lora_trainable(tiny_model, rank=6, alpha=6.0, seed=3, forward_mode=mode)

    def loss(p):
      return jnp.mean(forward.full_logits(trainable.bind(p), TOKENS, POSITIONS) ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)

  (factored, g_factored), (folded, g_folded) = loss_and_grad("factored"), loss_and_grad("folded")
  base = float(jnp.mean(forward.full_logits(tiny_model, TOKENS, POSITIONS) ** 2))
  assert float(factored) != pytest.approx(base, rel=1e-6)  # the adapters are not a no-op
  np.testing.assert_allclose(folded, factored, rtol=1e-5)
  for label in params:
    np.testing.assert_allclose(g_folded[label], g_factored[label], rtol=1e-4, atol=1e-6, err_msg=label)
  with pytest.raises(ValueError, match="forward_mode must be one of"):
    train_lib.lora_trainable(tiny_model, rank=2, alpha=2.0, seed=0, forward_mode="merged")


def test_lora_auto_mode_folds_only_when_it_is_cheaper():
  # Rank 512 on a 640 -> 2048 map: folding pays off for thousands of tokens, not one.
  def adapter(rank):
    a = pz.nx.zeros({"embedding": 640, "lowrank": rank})
    b = pz.nx.zeros({"lowrank": rank, "mlp": 2048})
    w = pz.nx.zeros({"embedding": 640, "mlp": 2048})
    linear = lambda v, i, o: pz.nn.Linear(weights=pz.ParameterValue(value=v, label="w"), in_axis_names=i, out_axis_names=o)
    return LowRankAdapter(
        base=linear(w, ("embedding",), ("mlp",)), down=linear(a, ("embedding",), ("lowrank",)),
        up=linear(b, ("lowrank",), ("mlp",)), scale=1.0,
    )

  many = pz.nx.zeros({"batch": 48, "seq": 40, "embedding": 640})
  one = pz.nx.zeros({"batch": 1, "seq": 1, "embedding": 640})
  assert adapter(512)._fold(many) and not adapter(512)._fold(one)
  assert not adapter(8)._fold(many)


def test_lora_frozen_leaves_get_no_optimizer_state(tiny_model):
  params, trainable, _ = train_lib.lora_trainable(tiny_model, rank=3, alpha=3.0, seed=0)
  assert all(k.endswith(("/lora_a.weights", "/lora_b.weights")) for k in params)
  assert set(trainable.frozen_values) == set(transformer.parameters_by_label(tiny_model))
  state = train_lib.init_state(params, CONFIG)
  labels_in_state = {
      key.key
      for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
      for key in path
      if isinstance(key, jax.tree_util.DictKey)
  }
  assert labels_in_state == set(params)
  param_bytes = 4 * train_lib.count_parameters(params)
  assert 2 * param_bytes <= train_lib.optimizer_state_bytes(state.opt_state) <= 2 * param_bytes + 64


def test_lora_training_changes_only_the_adapters(tiny_model, data, tmp_path):
  before = _values(tiny_model)
  params, trainable, _ = train_lib.lora_trainable(tiny_model, rank=4, alpha=8.0, seed=0)
  initial = jax.tree.map(np.asarray, params)
  result = train_lib.train(params, trainable, data, CONFIG, checkpoint_dir=str(tmp_path))
  assert [h["step"] for h in result.history] == [1, 2, 3]
  # Every A and B moved; the caller's initial params were not consumed.
  for label, value in result.params.items():
    assert not np.array_equal(np.asarray(value), initial[label]), label
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), initial)
  # The base weights the trainable holds, and the caller's model, are bitwise intact.
  for label, value in trainable.frozen_values.items():
    np.testing.assert_array_equal(np.asarray(value.unwrap(*value.named_shape)), before[label])
  for label, value in _values(tiny_model).items():
    np.testing.assert_array_equal(value, before[label], err_msg=label)
  # Merged: adapted matrices changed, everything else bitwise the base model's.
  merged = _values(result.model)
  adapted = set(trainable.effective_ranks)
  for label, value in merged.items():
    if label in adapted:
      assert not np.array_equal(value, before[label]), label
    else:
      np.testing.assert_array_equal(value, before[label], err_msg=label)
  # Folding B A into W computes what the adapters compute.
  np.testing.assert_allclose(
      forward.full_logits(result.model, TOKENS, POSITIONS),
      _logits(result.params, trainable, TOKENS, POSITIONS), rtol=1e-4, atol=1e-4,
  )
  # A LoRA checkpoint rebuilds the same merged model.
  loaded, meta = checkpoint.load_trained_model(tmp_path, base_model=tiny_model)
  assert meta["trainable"]["kind"] == "lora"
  for label, value in _values(loaded).items():
    np.testing.assert_array_equal(value, merged[label], err_msg=label)


# ----------------------------------------------------------------------------------
# Projection and callbacks, on a toy trainable.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BallTrainable:
  """A vector constrained to a ball: `project` is the only model-free part used."""

  radius: float = dataclasses.field(metadata={"static": True})

  def bind(self, params, compute_dtype="float32"):
    raise NotImplementedError

  def project(self, params):
    norm = jnp.linalg.norm(params["w"])
    return {"w": params["w"] * jnp.minimum(1.0, self.radius / norm)}

  def merge(self, params):
    return params


@dataclasses.dataclass(frozen=True)
class PushOutward:
  """loss = -<w, direction>: Adam walks w outward by ~lr per coordinate and step."""

  def normalizers(self, batch):
    return None

  def __call__(self, params, trainable, batch, rng, normalizers):
    loss = -jnp.sum(params["w"] * batch["direction"])
    return loss, {"loss": loss}


def test_project_is_applied_after_every_update_and_callback_sees_each_step():
  config = train_lib.EditConfig(steps=4, lr=1.0, clip_norm=None)
  batch_fn = lambda step: {"direction": np.ones((1, 3), np.float32)}  # [M=1, 3]
  seen = []

  def callback(step, params):
    seen.append((step, float(jnp.linalg.norm(params["w"]))))

  params = {"w": jnp.asarray([0.1, 0.0, 0.0])}
  result = train_lib.train(
      params, BallTrainable(radius=0.5), batch_fn, config, loss_fn=PushOutward(), callback=callback
  )
  assert [s for s, _ in seen] == [1, 2, 3, 4]
  # Without the projection the first update alone would leave |w| ~ 1.7.
  for (_, norm), h in zip(seen, result.history):
    assert norm == pytest.approx(0.5, rel=1e-5)
    assert h["param_norm"] == pytest.approx(0.5, rel=1e-5)
  assert result.model is result.params  # BallTrainable.merge is the identity
  unprojected = train_lib.train(params, BallTrainable(radius=100.0), batch_fn, config, loss_fn=PushOutward())
  assert unprojected.history[0]["param_norm"] > 1.5
