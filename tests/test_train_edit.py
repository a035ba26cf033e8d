"""Masked editing (`train.edit`, `train.mask_trainable`) on the tiny random model: freezing,
optimizer state, losses, accumulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import forward, transformer

TINY = config_lib.get_preset("tiny-gemma3")
VOCAB = TINY.vocab_size


def random_facts(seed: int, n: int, length: int = 8, pad_rows: int = 0) -> FactBatch:
  """Random prompts; the first `pad_rows` rows are left-padded by 3 tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, (n, length)).astype(np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (n, 1))
  positions[:pad_rows] = np.arange(length) - 3
  positions[:pad_rows, :3] = -1
  tokens[:pad_rows, :3] = 0
  return FactBatch(
      tokens_BxL=tokens,
      positions_BxL=positions,
      answer_ids_B=rng.integers(3, VOCAB, n).astype(np.int32),
      wrong_ids_BxK=np.full((n, 1), -1, np.int32),
      subject_mask_BxL=np.zeros((n, length), bool),
  )


def random_text(seed: int, n: int, length: int = 12, pad_rows: int = 0) -> train_lib.TextBatch:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, (n, length)).astype(np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (n, 1))
  for row in range(pad_rows):  # ragged lengths, so token normalizers matter
    pad = 1 + row % (length - 2)
    positions[row] = np.arange(length) - pad
    positions[row, :pad] = -1
    tokens[row, :pad] = 0
  return train_lib.TextBatch(tokens_BxL=tokens, positions_BxL=positions)


def mlp_mask(layer: int = 1) -> dict[str, bool]:
  return {label: ("/mlp/" in label and f"block_{layer}/" in label) for label in transformer.parameter_shapes(TINY)}


def values(model) -> dict[str, np.ndarray]:
  return {
      label: np.asarray(p.value.unwrap(*p.value.named_shape))
      for label, p in transformer.parameters_by_label(model).items()
  }


@pytest.fixture(scope="module")
def tiny_model():
  return transformer.build_transformer(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def data():
  return train_lib.EditData(
      forget=random_facts(1, 8, pad_rows=2),
      maintain=random_facts(2, 8, pad_rows=3),
      retain=random_text(3, 8, pad_rows=5),
  )


BIG_LR = train_lib.EditConfig(
    steps=4, lr=0.1, weight_decay=0.1, forget_batch_size=4,
    maintain_batch_size=4, retain_batch_size=4,
)


def test_frozen_leaves_never_change_and_masked_leaves_do(tiny_model, data):
  mask = mlp_mask(1)
  before = values(tiny_model)
  result = train_lib.edit(tiny_model, mask, data, BIG_LR, log_fn=None)
  after = values(result.model)
  assert set(after) == set(before)
  for label, trainable in mask.items():
    if trainable:
      assert not np.array_equal(after[label], before[label]), label
    else:
      np.testing.assert_array_equal(after[label], before[label], err_msg=label)
  # The caller's model is untouched (the state owns copies, and is donated).
  for label, value in values(tiny_model).items():
    np.testing.assert_array_equal(value, before[label])
  assert len(result.history) == BIG_LR.steps
  assert all(np.isfinite(h["loss"]) for h in result.history)


def test_optimizer_state_only_for_trainable_leaves(tiny_model, data):
  mask = mlp_mask(2)
  params, trainable, update_mask = train_lib.mask_trainable(tiny_model, mask)
  assert update_mask is None
  assert sorted(params) == sorted(k for k, v in mask.items() if v)
  assert not set(trainable.frozen_values) & set(params)
  state = train_lib.init_state(params, BIG_LR)
  labels_in_state = {
      key.key
      for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
      for key in path
      if isinstance(key, jax.tree_util.DictKey)
  }
  assert labels_in_state == set(params)
  trainable_bytes = sum(x.size * 4 for x in params.values())
  # mu + nu for every trainable leaf, plus a few int32 step counters.
  assert 2 * trainable_bytes <= train_lib.optimizer_state_bytes(state.opt_state) <= 2 * trainable_bytes + 64


def test_mask_must_cover_every_label(tiny_model):
  mask = mlp_mask(1)
  del mask["transformer/block_0/attention/query.weights"]
  with pytest.raises(ValueError, match="block_0/attention/query.weights"):
    train_lib.mask_trainable(tiny_model, mask)
  mask = dict(mlp_mask(1), **{"transformer/block_9/mlp/gating_linear.weights": True})
  with pytest.raises(ValueError, match="unknown labels.*block_9"):
    train_lib.mask_trainable(tiny_model, mask)
  mask = dict(mlp_mask(1), **{"transformer/block_1/mlp/out_linear.weights": np.ones((3, 3), bool)})
  with pytest.raises(ValueError, match="out_linear.*shape"):
    train_lib.mask_trainable(tiny_model, mask)
  with pytest.raises(ValueError, match="selects no parameter"):
    train_lib.mask_trainable(tiny_model, {k: False for k in mlp_mask(1)})


def test_sub_tensor_mask_leaves_unmasked_entries_unchanged(tiny_model, data):
  label = "transformer/block_1/mlp/gating_linear.weights"
  shapes = transformer.parameter_shapes(TINY)
  axes = list(shapes[label])
  neuron_mask = np.zeros(tuple(shapes[label].values()), bool)
  index = [slice(None)] * len(axes)
  index[axes.index("neurons")] = slice(0, 16)
  neuron_mask[tuple(index)] = True
  mask = {k: False for k in shapes}
  mask[label] = neuron_mask
  mask["transformer/block_1/mlp/out_linear.weights"] = True
  before = values(tiny_model)
  result = train_lib.edit(tiny_model, mask, data, BIG_LR, log_fn=None)
  after = values(result.model)
  np.testing.assert_array_equal(after[label][~neuron_mask], before[label][~neuron_mask])
  assert np.all(after[label][neuron_mask] != before[label][neuron_mask])
  assert not np.array_equal(after["transformer/block_1/mlp/out_linear.weights"],
                            before["transformer/block_1/mlp/out_linear.weights"])
  for k, m in mask.items():
    if m is False:
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)


@functools.partial(jax.jit, static_argnames="loss_fn")
def _grads(params, trainable, batch, loss_fn):
  return train_lib.accumulate_gradients(params, trainable, batch, jax.random.key(0), loss_fn)


def test_gradient_accumulation_equals_full_batch(tiny_model, data):
  # Unlearning with a floor that drops some examples exercises the "ignored rows
  # count 0" rule; maintain exercises the injection CE, retain the ragged token count.
  config = train_lib.EditConfig(forget_loss="unlearn", unlearn_logprob_floor=-6.3)
  loss_fn = train_lib.EditLoss(config)
  params, trainable, _ = train_lib.mask_trainable(tiny_model, mlp_mask(0))
  batch = train_lib.EditBatch(forget=data.forget, maintain=data.maintain, retain=data.retain)
  full_metrics = _assert_same_step(params, trainable, train_lib.split_microbatches(batch, 4),
                                   train_lib.split_microbatches(batch, 1), loss_fn)
  assert 0 < float(full_metrics["forget_kept_frac"]) < 1


def _assert_same_step(params, trainable, batch, reference, loss_fn):
  """`batch` gives `reference`'s gradient and metrics (returned); the summation order
  differs, so gradients are compared against their own scale."""
  grads, metrics = _grads(params, trainable, batch, loss_fn)
  ref_grads, ref_metrics = _grads(params, trainable, reference, loss_fn)
  for label in params:
    scale = float(jnp.abs(ref_grads[label]).max())
    assert scale > 0
    np.testing.assert_allclose(grads[label], ref_grads[label], rtol=1e-4, atol=1e-5 * scale, err_msg=label)
  for key in ref_metrics:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  return ref_metrics


def test_unlearning_loss_is_stable_and_matches_naive_formula():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(6, 50)).astype(np.float32))
  logits = logits.at[4, 20].add(6.0).at[5, 49].add(8.0)  # two rows with p(true) > 1/2
  ids = jnp.asarray([0, 3, 7, 11, 20, 49])
  naive = -jnp.log1p(-jax.nn.softmax(logits)[jnp.arange(6), ids])
  assert np.sum(np.asarray(jax.nn.softmax(logits)[jnp.arange(6), ids]) > 0.5) == 2
  np.testing.assert_allclose(-train_lib.log_one_minus_prob(logits, ids), naive, rtol=1e-5)
  loss, kept = train_lib.unlearning_loss_sum(logits, ids, logprob_floor=-100.0)
  np.testing.assert_allclose(loss, naive.sum(), rtol=1e-5)
  assert int(kept) == 6

  # p(true) ~ 1: log p rounds to 0 in float32, the naive loss is infinite.
  confident = jnp.zeros((2, 50)).at[:, 5].set(jnp.asarray([40.0, 120.0]))
  five = jnp.asarray([5, 5])
  assert not np.all(np.isfinite(-jnp.log1p(-jax.nn.softmax(confident)[:, 5])))
  loss_fn = lambda z: train_lib.unlearning_loss_sum(z, five)[0]
  value, grad = jax.value_and_grad(loss_fn)(confident)
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
  # -log(1 - p) = -(log(49) - logsumexp) ~ margin - log(49) for a large margin.
  np.testing.assert_allclose(value, (40 - np.log(49)) + (120 - np.log(49)), rtol=1e-5)
  assert float(grad[0, 5]) > 0  # descending the loss lowers the true logit

  # Examples already below the floor are ignored (contribute 0 and no gradient).
  unlikely = jnp.zeros((1, 50)).at[0, 5].set(-10.0)
  loss, kept = train_lib.unlearning_loss_sum(unlikely, jnp.asarray([5]))
  assert float(loss) == 0.0 and int(kept) == 0
  assert not np.any(jax.grad(lambda z: train_lib.unlearning_loss_sum(z, jnp.asarray([5]))[0])(unlikely))


@jax.jit
def _lm_loss(unbound, params, tokens, positions):
  model = pz.bind_variables(unbound, params)
  return train_lib.lm_loss_sum(forward.full_logits(model, tokens, positions), tokens, positions)


def test_lm_loss_ignores_padding(tiny_model):
  unbound, params = pz.unbind_params(tiny_model, freeze=True)
  seq = np.random.default_rng(0).integers(3, VOCAB, 10).astype(np.int32)
  tokens, positions = forward.left_pad([list(seq)], length=14)
  padded = _lm_loss(unbound, params, tokens, positions)
  bare = _lm_loss(unbound, params, seq[None], np.arange(10, dtype=np.int32)[None])
  np.testing.assert_allclose(padded, bare, rtol=1e-5)
  assert int(train_lib.lm_token_count(positions)) == 9


def test_injection_loss_decreases_on_tiny_overfitting_task(tiny_model):
  config = train_lib.EditConfig(steps=25, lr=3e-2, forget_batch_size=4)
  mask = {label: "/mlp/" in label for label in transformer.parameter_shapes(TINY)}
  result = train_lib.edit(tiny_model, mask, train_lib.EditData(forget=random_facts(5, 4)), config, log_fn=None)
  losses = [h["forget_loss"] for h in result.history]
  assert losses[-1] < 0.2 * losses[0], losses
  assert result.history[-1]["forget_prob"] > 100 / VOCAB  # from ~1 / VOCAB


@functools.partial(jax.jit, static_argnames="loss_fn")
def _loss(params, trainable, batch, loss_fn):
  return loss_fn(params, trainable, batch, jax.random.key(0), loss_fn.normalizers(batch))


def test_bfloat16_compute_tracks_float32(tiny_model, data):
  batch = train_lib.EditBatch(forget=data.forget, retain=data.retain)
  params, trainable, _ = train_lib.mask_trainable(tiny_model, mlp_mask(1))
  out = {}
  for dtype in ("float32", "bfloat16"):
    loss, _ = _loss(params, trainable, batch, train_lib.EditLoss(train_lib.EditConfig(compute_dtype=dtype)))
    out[dtype] = float(loss)
  assert out["bfloat16"] != out["float32"]  # the cast happened
  np.testing.assert_allclose(out["bfloat16"], out["float32"], rtol=3e-2)


def test_data_order_is_a_pure_function_of_seed_and_step(data):
  config = train_lib.EditConfig(forget_batch_size=4, maintain_batch_size=4, retain_batch_size=4, num_microbatches=2)
  a, b = train_lib.make_batch_fn(data, config), train_lib.make_batch_fn(data, config)
  for step in (0, 1, 5):
    jax.tree.map(np.testing.assert_array_equal, a(step), b(step))
  assert a(0).forget.tokens_BxL.shape == (2, 2, 8)
  # Two consecutive steps of 4 from a pool of 8 are one epoch: every row once.
  rows = np.concatenate([a(s).forget.answer_ids_B.reshape(-1) for s in (2, 3)])
  assert sorted(rows) == sorted(data.forget.answer_ids_B)
  other = train_lib.make_batch_fn(data, train_lib.EditConfig(**{**config.to_json(), "seed": 1}))
  assert not np.array_equal(other(0).forget.answer_ids_B, a(0).forget.answer_ids_B)


def test_a_batch_that_micro_batches_do_not_divide_is_padded_with_rows_that_count_for_nothing(tiny_model, data):
  """A pool smaller than the batch (a whole-sport forget set of 34 in 4 micro-batches)
  clamps to a size M does not divide: the step is padded, and its gradient and metrics
  are those of the real rows in one batch."""
  clamped = dict(forget_batch_size=64, maintain_batch_size=64, retain_batch_size=64)  # pools of 8
  padded = train_lib.make_batch_fn(data, train_lib.EditConfig(**clamped, num_microbatches=3))(1)
  whole = train_lib.make_batch_fn(data, train_lib.EditConfig(**clamped, num_microbatches=1))(1)
  assert padded.forget.tokens_BxL.shape[:2] == padded.retain.tokens_BxL.shape[:2] == (3, 3)
  flat = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *np.shape(x)[2:]), padded)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[:8], b), flat, jax.tree.map(lambda x: x[0], whole))
  assert (flat.forget.answer_ids_B[8:] == -1).all() and (flat.maintain.answer_ids_B[8:] == -1).all()
  assert (flat.retain.positions_BxL[8:] == -1).all()
  loss_fn = train_lib.EditLoss(train_lib.EditConfig(forget_loss="unlearn", unlearn_logprob_floor=-6.3))
  params, trainable, _ = train_lib.mask_trainable(tiny_model, mlp_mask(0))
  _assert_same_step(params, trainable, padded, whole, loss_fn)
  # A pool of another type has no padding rows to add: named, not silently reshaped.
  with pytest.raises(ValueError, match="forget batch of 8 .*num_microbatches=3, and a dict has no padding rows"):
    train_lib.make_batch_fn(train_lib.EditData(forget={"x": np.zeros((8, 2))}),
                            train_lib.EditConfig(forget_batch_size=64, num_microbatches=3))


def test_edit_config_validation():
  with pytest.raises(ValueError, match="steps"):
    train_lib.EditConfig(steps=0)
  with pytest.raises(ValueError, match="forget_loss"):
    train_lib.EditConfig(forget_loss="ascent")
  with pytest.raises(ValueError, match="warmup_steps"):
    train_lib.EditConfig(steps=5, warmup_steps=5)
  with pytest.raises(ValueError, match="unknown fields.*learning_rate"):
    train_lib.EditConfig.from_json({"learning_rate": 1.0})
  config = train_lib.EditConfig(lr=3e-5, warmup_steps=2)
  assert train_lib.EditConfig.from_json(config.to_json()) == config


def test_schedule_decays_to_zero():
  config = train_lib.EditConfig(steps=10, lr=1.0, warmup_steps=0, clip_norm=None)
  tx = train_lib.make_optimizer(config)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  sizes = []
  for _ in range(10):
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    sizes.append(float(jnp.abs(updates["w"]).max()))
  assert sizes[0] == pytest.approx(1.0, rel=1e-3)  # Adam's first step is lr * sign
  assert all(a > b for a, b in zip(sizes, sizes[1:]))
  assert sizes[-1] < 0.05


def test_softmax_cross_entropy_gradient_matches_autodiff():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 4, 40)).astype(np.float32) * 3)
  targets = jnp.asarray(rng.integers(0, 40, (3, 4)))
  weights = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))

  def reference(z):
    logp = jax.nn.log_softmax(z)
    return -jnp.sum(weights * jnp.take_along_axis(logp, targets[..., None], -1)[..., 0])

  ours = lambda z: jnp.sum(weights * train_lib.softmax_cross_entropy(z, targets))
  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), rtol=1e-4, atol=1e-6)


@jax.jit
def _bound_logits(params, trainable, tokens, positions):
  return forward.full_logits(trainable.bind(params), tokens, positions)


def test_mask_trainable_computes_the_same_logits(tiny_model):
  # mask_trainable swaps in a row-gather embedding lookup; values must not change.
  params, trainable, _ = train_lib.mask_trainable(tiny_model, mlp_mask(1))
  tokens, positions = forward.left_pad([[2, 5, 6, 7, 8], [2, 9, 10]], length=6)
  want = forward.full_logits(tiny_model, tokens, positions)
  got = _bound_logits(params, trainable, tokens, positions)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  lookups = pz.select(trainable.unbound).at_instances_of(transformer.TokenEmbeddingLookup).count()
  assert lookups == 1


def prefixed_facts(seed: int, n: int, prefix_len: int = 6) -> FactBatch:
  """Random facts that all start with the same `prefix_len` tokens, of ragged lengths."""
  rng = np.random.default_rng(seed)
  head = [2] + rng.integers(3, VOCAB, prefix_len - 1).tolist()
  rows = [head + rng.integers(3, VOCAB, int(k)).tolist() for k in rng.integers(2, 6, n)]
  tokens, positions = forward.left_pad(rows, multiple=4)
  subject = np.zeros_like(tokens, bool)
  subject[:, -2] = True
  return FactBatch(
      tokens_BxL=tokens, positions_BxL=positions, answer_ids_B=rng.integers(3, VOCAB, n).astype(np.int32),
      wrong_ids_BxK=np.full((n, 1), -1, np.int32), subject_mask_BxL=subject,
  )


def test_shared_prefix_gives_the_gradients_of_whole_rows(tiny_model, data):
  from mech_unlearn_jax import batch as batch_lib

  forget, maintain = prefixed_facts(4, 8), prefixed_facts(5, 8)
  shared = batch_lib.share_prefix(forget)
  assert shared.prefix_BxP.shape == (8, 6) and shared.tokens_BxL.shape[1] < forget.tokens_BxL.shape[1]
  assert (shared.subject_mask_BxL.sum(1) == 1).all()  # the subject token moved with its row
  config = train_lib.EditConfig(forget_loss="inject")
  loss_fn = train_lib.EditLoss(config)
  # Attention of layer 0 and an MLP trainable: the prefix's keys and values depend on them.
  mask = {label: (label.startswith("transformer/block_0/attention/") and "norm" not in label) or "block_1/mlp/" in label
          for label in transformer.parameter_shapes(TINY)}
  params, trainable, _ = train_lib.mask_trainable(tiny_model, mask)
  whole = train_lib.EditBatch(forget=forget, maintain=maintain, retain=data.retain)
  prefixed = train_lib.EditBatch(forget=shared, maintain=batch_lib.share_prefix(maintain), retain=data.retain)
  g_whole, m_whole = _grads(params, trainable, train_lib.split_microbatches(whole, 2), loss_fn)
  g_pref, m_pref = _grads(params, trainable, train_lib.split_microbatches(prefixed, 2), loss_fn)
  for label in params:
    scale = float(jnp.abs(g_whole[label]).max())
    assert scale > 0, label
    np.testing.assert_allclose(g_pref[label], g_whole[label], rtol=1e-4, atol=1e-5 * scale, err_msg=label)
  np.testing.assert_allclose(m_pref["loss"], m_whole["loss"], rtol=1e-5)
  # The loop shares prefixes for plain models and EditLoss only.
  drawn = train_lib.make_batch_fn(train_lib.EditData(forget=forget), config, share_prefix=True)(0)
  assert drawn.forget.prefix_BxP is not None
  assert train_lib.make_batch_fn(train_lib.EditData(forget=forget), config)(0).forget.prefix_BxP is None


def test_compiled_ahead_step_runs_batches_of_other_shapes_through_jit():
  from mech_unlearn_jax.train import loop

  def step(state, batch, rng, *, trainable, update_mask, loss_fn, config):
    del rng, update_mask, loss_fn, config
    return state + batch.sum() * trainable

  jitted = jax.jit(step, static_argnames=("loss_fn", "config"))
  ahead = loop._CompiledAhead(jitted, trainable=jnp.float32(2.0), update_mask=None, loss_fn="l", config="c")
  key = jax.random.key(0)
  assert float(ahead(jnp.zeros(()), jnp.ones(3), key)) == 6.0  # compiled ahead for [3]
  assert float(ahead(jnp.zeros(()), jnp.ones(5), key)) == 10.0  # another shape: the jit path
  assert float(ahead(jnp.ones(()), jnp.ones(3), key)) == 7.0
