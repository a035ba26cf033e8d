"""Soft-prompt trainables (prefix, embedding adapter) and the soft-prompt attack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import forward, transformer
from mech_unlearn_jax.train import soft_prompt as sp

TINY = config_lib.get_preset("tiny-gemma3")
INSERTED = [40, 41, 42]  # the prefix, as real tokens, in the equivalence test


@pytest.fixture(scope="module")
def tiny_model():
  return transformer.build_transformer(TINY, jax.random.key(0))


def _rows():
  rng = np.random.default_rng(0)
  return [[2] + rng.integers(50, TINY.vocab_size, n).tolist() for n in (6, 3, 9)]


def test_projection_bounds_every_vector(tiny_model):
  params, trainable, update_mask = sp.soft_prompt_trainable(tiny_model, num_vectors=4, max_norm=0.5, seed=0)
  assert update_mask is None and params[sp.SOFT_PROMPT].shape == (4, TINY.embedding_dim)
  big = {sp.SOFT_PROMPT: params[sp.SOFT_PROMPT] * 1000.0 + 1.0}
  norms = jnp.linalg.norm(trainable.project(big)[sp.SOFT_PROMPT], axis=-1)
  assert float(norms.max()) <= 0.5 + 1e-5 and float(norms.min()) > 0.49
  small = {sp.SOFT_PROMPT: jnp.full((4, TINY.embedding_dim), 1e-3)}
  np.testing.assert_array_equal(trainable.project(small)[sp.SOFT_PROMPT], small[sp.SOFT_PROMPT])
  # The initial prefix already satisfies the bound.
  assert float(jnp.linalg.norm(params[sp.SOFT_PROMPT], axis=-1).max()) <= 0.5 + 1e-5

  aparams, adapter, _ = sp.embedding_adapter_trainable(tiny_model, num_keys=5, max_norm=2.0, seed=1)
  huge = jax.tree.map(lambda x: x * 0 + 7.0, aparams)
  for name, value in adapter.project(huge).items():
    assert float(jnp.linalg.norm(value, axis=-1).max()) <= 2.0 + 1e-5, name
  with pytest.raises(ValueError, match="max_norm"):
    sp.soft_prompt_trainable(tiny_model, num_vectors=2, max_norm=0.0, seed=0)
  with pytest.raises(ValueError, match="num_vectors"):
    sp.soft_prompt_trainable(tiny_model, num_vectors=0, max_norm=1.0, seed=0)


def test_prefix_equals_tokens_inserted_after_bos(tiny_model):
  """A prefix of real token embeddings = the base model on the longer token sequence."""
  params, trainable, _ = sp.soft_prompt_trainable(tiny_model, num_vectors=3, max_norm=1e6, seed=0)
  prefix = sp.embed_tokens(tiny_model, INSERTED)
  bound = trainable.bind({sp.SOFT_PROMPT: prefix})
  rows = _rows()
  tokens, positions = forward.left_pad(rows)
  got = np.asarray(forward.full_logits(bound, tokens, positions))
  longer = [r[:1] + INSERTED + r[1:] for r in rows]
  ltokens, lpositions = forward.left_pad(longer)
  want = np.asarray(forward.full_logits(tiny_model, ltokens, lpositions))
  for row, r in enumerate(rows):
    n = len(r)  # the caller's real columns are the last n; BOS is the first of them
    np.testing.assert_allclose(got[row, -n + 1 :], want[row, -n + 1 :], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[row, -n], want[row, -n - 3], rtol=1e-4, atol=1e-4)
  # Selected positions are the caller's columns too.
  last = forward.last_logits(bound, tokens, positions)
  np.testing.assert_allclose(np.asarray(last), got[:, -1], rtol=1e-5, atol=1e-5)
  # The prefix changes the output (it is attended to), unlike a no-op.
  base = np.asarray(forward.last_logits(tiny_model, tokens, positions))
  assert np.abs(base - got[:, -1]).max() > 1e-3


@pytest.mark.parametrize("kind", ["prefix", "adapter"])
def test_left_padding_does_not_change_last_logits(tiny_model, kind):
  if kind == "prefix":
    params, trainable, _ = sp.soft_prompt_trainable(tiny_model, num_vectors=2, max_norm=5.0, seed=3)
  else:
    params, trainable, _ = sp.embedding_adapter_trainable(tiny_model, num_keys=3, max_norm=5.0, seed=3)
    params = dict(params, **{sp.ADAPTER_VALUES: jnp.ones_like(params[sp.ADAPTER_VALUES])})
  bound = trainable.bind(params)
  rows = _rows()
  tight = forward.left_pad(rows)
  loose = forward.left_pad(rows, length=16)
  a = np.asarray(forward.last_logits(bound, *tight))
  b = np.asarray(forward.last_logits(bound, *loose))
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  for row, r in enumerate(rows):  # and batching with other rows does not matter
    alone = np.asarray(forward.last_logits(bound, *forward.left_pad([r])))
    np.testing.assert_allclose(alone[0], a[row], rtol=1e-4, atol=1e-4)


def test_shared_prefix_run_equals_whole_rows_for_a_soft_prompt(tiny_model):
  """Rows split at their common prefix (one-shot example) run the prefix, with the soft
  prompt inside it, once: same logits and same gradient as running every row whole."""
  from mech_unlearn_jax import batch as batch_lib  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax import interventions as iv  # pylint: disable=g-import-not-at-top

  params, trainable, _ = sp.soft_prompt_trainable(tiny_model, num_vectors=3, max_norm=5.0, seed=4)
  shared = [2, 77, 78, 79, 80, 81]
  rows = [shared + r[1:] for r in _rows()]
  tokens, positions = forward.left_pad(rows)
  prefix, suffix, suffix_positions = batch_lib.split_prefix(
      tokens, positions, batch_lib.shared_prefix_length(tokens, positions)
  )
  assert len(prefix) == len(shared)
  assert iv.shares_prefixes(trainable.bind(params))

  def whole(p):
    return forward.last_logits(trainable.bind(p), tokens, positions)

  def split(p):
    return iv.last_logits_with_prefix(trainable.bind(p), prefix, suffix, suffix_positions)

  np.testing.assert_allclose(np.asarray(split(params)), np.asarray(whole(params)), rtol=1e-4, atol=1e-4)
  grad_whole = jax.grad(lambda p: whole(p)[:, 60].sum())(params)[sp.SOFT_PROMPT]
  grad_split = jax.grad(lambda p: split(p)[:, 60].sum())(params)[sp.SOFT_PROMPT]
  assert float(jnp.abs(grad_whole).max()) > 0
  np.testing.assert_allclose(np.asarray(grad_split), np.asarray(grad_whole), rtol=1e-3, atol=1e-5)
  # Scoring takes the shared-prefix path and gives the whole rows' answer.
  from mech_unlearn_jax.evals import scoring  # pylint: disable=g-import-not-at-top

  facts = FactBatch(
      tokens_BxL=tokens, positions_BxL=positions, answer_ids_B=np.full(len(rows), 60, np.int32),
      wrong_ids_BxK=np.tile([61, 62], (len(rows), 1)).astype(np.int32), subject_mask_BxL=np.zeros(tokens.shape, bool),
  )
  merged = trainable.merge(params)
  # Training batches are split at the prefix too (the attack's step runs it once).
  from mech_unlearn_jax.train import loop  # pylint: disable=g-import-not-at-top

  assert loop.can_share_prefix(EditLoss(EditConfig()), trainable, params)
  aparams, adapter, _ = sp.embedding_adapter_trainable(tiny_model, num_keys=2, max_norm=1.0, seed=0)
  assert loop.can_share_prefix(EditLoss(EditConfig()), adapter, aparams)
  a = scoring.score_facts(merged, facts, share_prefix=True)
  b = scoring.score_facts(merged, facts, share_prefix=False)
  np.testing.assert_allclose(a.prob_normalized, b.prob_normalized, rtol=1e-4, atol=1e-5)


def test_seeded_attacks_share_one_traced_step(tiny_model):
  """The seed is data, not part of the tree structure: attacks differing only in their
  seed reuse the jitted step instead of tracing it again."""
  for make, size in ((sp.soft_prompt_trainable, "num_vectors"), (sp.embedding_adapter_trainable, "num_keys")):
    made = [make(tiny_model, **{size: 2}, max_norm=1.0, seed=seed) for seed in (0, 1)]
    (params0, trainable0, _), (params1, trainable1, _) = made
    assert jax.tree.structure(trainable0) == jax.tree.structure(trainable1)
    assert not np.allclose(np.asarray(jax.tree.leaves(params0)[0]), np.asarray(jax.tree.leaves(params1)[0]))
    assert trainable1.spec()["seed"] == 1
    traces = []

    @jax.jit
    def project(params, trainable):
      traces.append(1)
      return trainable.project(params)

    project(params0, trainable0)
    project(params1, trainable1)
    assert len(traces) == 1


def test_adapter_with_zero_values_is_exactly_the_base_model(tiny_model):
  params, trainable, _ = sp.embedding_adapter_trainable(tiny_model, num_keys=4, max_norm=3.0, seed=0)
  tokens, positions = forward.left_pad(_rows())
  base = np.asarray(forward.full_logits(tiny_model, tokens, positions))
  np.testing.assert_array_equal(np.asarray(forward.full_logits(trainable.bind(params), tokens, positions)), base)
  np.testing.assert_array_equal(np.asarray(forward.full_logits(trainable.merge(params), tokens, positions)), base)
  # Nonzero values move each embedding by at most max_norm.
  moved = dict(params, **{sp.ADAPTER_VALUES: jnp.full_like(params[sp.ADAPTER_VALUES], 10.0)})
  moved = trainable.project(moved)
  ids = np.array([5, 6, 7])
  e0 = sp.embed_tokens(tiny_model, ids)
  e1 = sp.embed_tokens(trainable.bind(moved), ids)
  shift = np.linalg.norm(np.asarray(e1 - e0), axis=-1)
  assert shift.max() <= 3.0 + 1e-4 and shift.min() > 1.0


def test_bind_inside_jit_with_the_trainable_as_an_input(tiny_model):
  params, trainable, _ = sp.soft_prompt_trainable(tiny_model, num_vectors=2, max_norm=5.0, seed=0)
  tokens, positions = forward.left_pad(_rows())

  @jax.jit
  def run(params, trainable):
    return forward.last_logits(trainable.bind(params), tokens, positions)

  eager = forward.last_logits(trainable.merge(params), tokens, positions)
  np.testing.assert_allclose(np.asarray(run(params, trainable)), np.asarray(eager), rtol=1e-5, atol=1e-5)
  bf16 = jax.jit(lambda p, t: forward.last_logits(t.bind(p, "bfloat16"), tokens, positions))(params, trainable)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(eager), atol=0.1)
  # Frozen weights are pytree leaves of the trainable (inputs, not constants).
  assert len(jax.tree.leaves(trainable)) >= len(transformer.parameters_by_label(tiny_model))
  assert trainable.spec() == {"kind": "soft_prompt", "num_vectors": 2, "max_norm": 5.0, "seed": 0}


def test_median_embedding_norm(tiny_model):
  norm = sp.median_embedding_norm(tiny_model, num_tokens=256)
  table = tiny_model.embed.sublayers[0].table.embeddings.value.unwrap("vocabulary", "embedding")
  raw = float(np.median(np.linalg.norm(np.asarray(table), axis=-1)))
  assert norm == pytest.approx(raw * np.sqrt(TINY.embedding_dim), rel=0.2)


# ----------------------------------------------------------------------------------
# The attack.

from mech_unlearn_jax.evals import softprompt  # pylint: disable=g-import-not-at-top
from mech_unlearn_jax.train import EditConfig, EditData, EditLoss, train  # pylint: disable=g-import-not-at-top

CANDIDATES = np.array([60, 61, 62])


def fact_batch(seed: int, n: int, length: int = 8) -> FactBatch:
  """Random left-padded prompts whose true answer is candidate 0 (token 60)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(70, TINY.vocab_size, (n, length)).astype(np.int32)
  tokens[:, 0] = 2
  positions = np.tile(np.arange(length, dtype=np.int32), (n, 1))
  for row in range(0, n, 2):
    tokens[row, 2:] = tokens[row, :-2].copy()
    tokens[row, :2] = 0
    positions[row] = np.arange(length) - 2
    positions[row, :2] = -1
  return FactBatch(
      tokens_BxL=tokens,
      positions_BxL=positions,
      answer_ids_B=np.full(n, CANDIDATES[0], np.int32),
      wrong_ids_BxK=np.tile(CANDIDATES[1:], (n, 1)).astype(np.int32),
      subject_mask_BxL=np.zeros_like(tokens, bool),
  )


def _values(model):
  return {k: np.asarray(p.value.unwrap(*p.value.named_shape)) for k, p in transformer.parameters_by_label(model).items()}


@pytest.mark.parametrize("kind", ["prefix", "adapter"])
def test_attack_raises_p_true_on_its_training_facts(tiny_model, kind):
  before = _values(tiny_model)
  config = softprompt.SoftPromptAttackConfig(
      kind=kind, num_vectors=2, max_norm=20.0, num_attacks=2, eval_steps=(5,),
      training=EditConfig(steps=15, lr=0.1, maintain_coef=0.0, retain_coef=0.0, forget_batch_size=8),
  )
  result = softprompt.soft_prompt_attack(tiny_model, fact_batch(1, 8), fact_batch(2, 6), config)
  assert len(result.runs) == 2 and {r["seed"] for r in result.runs} == {0, 1}
  for run in result.runs:
    assert run["train"]["prob_normalized"] > result.before_train["prob_normalized"] + 0.2
    assert set(run["eval_at_step"]) == {"5"}
  assert result.summary["prob_normalized_min"] <= result.summary["prob_normalized_mean"] <= result.summary["prob_normalized_max"]
  assert result.num_trained_parameters == (1 if kind == "prefix" else 2) * 2 * TINY.embedding_dim
  out = result.to_json()
  assert out["config"]["kind"] == kind and out["before_eval"]["n"] == 6
  # The attacked model is untouched (and its buffers still valid after donation).
  for label, value in _values(tiny_model).items():
    np.testing.assert_array_equal(value, before[label])


def test_training_changes_only_the_soft_prompt(tiny_model):
  params, trainable, mask = sp.soft_prompt_trainable(tiny_model, num_vectors=2, max_norm=3.0, seed=0)
  config = EditConfig(steps=3, lr=0.5, maintain_coef=0.0, retain_coef=0.0, forget_batch_size=4)
  result = train(params, trainable, EditData(forget=fact_batch(3, 4)), config, update_mask=mask, loss_fn=EditLoss(config))
  trained = result.params[sp.SOFT_PROMPT]
  assert not np.allclose(np.asarray(trained), np.asarray(params[sp.SOFT_PROMPT]))
  # The projection ran after every update: the bound holds after training.
  assert float(jnp.linalg.norm(trained, axis=-1).max()) <= 3.0 + 1e-5
  merged = result.model
  assert isinstance(merged, sp.SoftPromptLM)
  base = _values(tiny_model)
  for label, value in _values(merged).items():
    np.testing.assert_array_equal(value, base[label])
  np.testing.assert_array_equal(np.asarray(merged.soft_prompt_KxD), np.asarray(trained))


def test_attack_config_validation():
  with pytest.raises(ValueError, match="inject"):
    softprompt.SoftPromptAttackConfig(training=EditConfig(forget_loss="unlearn"))
  with pytest.raises(ValueError, match="kind"):
    softprompt.SoftPromptAttackConfig(kind="lora")
  with pytest.raises(ValueError, match="eval_steps"):
    softprompt.SoftPromptAttackConfig(eval_steps=(1000,))
