"""Losses of editing and unlearning (METHOD §3) and the batches they read.

Every term is a *sum* over examples (or predicted tokens); `EditLoss` divides by
whole-step normalizers so gradients accumulate exactly over micro-batches (see
`step.py`). Facts are left-padded (`models/forward.py`): a fact's answer is predicted
at column -1, and rows with answer id -1 are padding that count for nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models import forward
from mech_unlearn_jax.train.step import EditConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TextBatch:
  """Left-padded text windows for the next-token LM loss (positions -1 on padding)."""

  tokens_BxL: np.ndarray
  positions_BxL: np.ndarray

  @property
  def size(self) -> int:
    return int(self.tokens_BxL.shape[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EditBatch:
  """One step's examples per loss term; a term is None when it is not used.

  `forget.answer_ids_B` are the edit targets ("inject") or the true answers
  ("unlearn"); `maintain.answer_ids_B` are true answers. Rows with answer id -1 are
  padding and count for nothing.
  """

  forget: FactBatch | None = None
  maintain: FactBatch | None = None
  retain: TextBatch | None = None


@jax.custom_vjp
def softmax_cross_entropy(logits_NxV: jax.Array, targets_N: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] along the last axis (any leading axes), float32.

  A custom VJP because the autodiff of logsumexp + take_along_axis keeps exp(logits)
  alive and scatters into a zero buffer: with a 262k vocabulary that is several
  [tokens, vocab] float32 buffers. Here the backward pass recomputes the softmax in
  one fused elementwise pass from the logits and the logsumexp.
  """
  return _xent_fwd(logits_NxV, targets_N)[0]


def _xent_fwd(logits, targets):
  logits32 = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits32, axis=-1)
  picked = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]
  return lse - picked, (logits, targets, lse)


def _xent_bwd(residuals, g):
  logits, targets, lse = residuals
  vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
  probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  grad = (probs - (vocab == targets[..., None]).astype(jnp.float32)) * g[..., None]
  return grad.astype(logits.dtype), None


softmax_cross_entropy.defvjp(_xent_fwd, _xent_bwd)


def answer_logprobs(logits_BxV: jax.Array, ids_B: jax.Array) -> jax.Array:
  """log p(ids) under full-vocabulary softmax; ids < 0 give 0."""
  ce = softmax_cross_entropy(logits_BxV, jnp.maximum(ids_B, 0).astype(jnp.int32))
  return jnp.where(ids_B >= 0, -ce, 0.0)


def log_one_minus_prob(logits_BxV: jax.Array, ids_B: jax.Array) -> jax.Array:
  """log(1 - p(ids)) under the full-vocabulary softmax, accurate for every p.

  Two branches, each exact where it is used: for p < 1/2, log1p(-exp(log p)); for
  p >= 1/2, logsumexp over the *other* tokens minus logsumexp over all. The second
  stays finite where log p rounds to 0 in float32 (p within 6e-8 of 1), where
  log1p(-exp(log p)) and its gradient are infinite; the first avoids the second's
  cancellation when p is small. The untaken branch is fed clamped inputs so its
  gradient is never inf * 0.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits_BxV, axis=-1)
  picked = jnp.take_along_axis(logits_BxV, ids_B[:, None], axis=-1)[:, 0]
  logp = picked - lse
  vocab = jnp.arange(logits_BxV.shape[-1])
  others = jnp.where(vocab[None, :] == ids_B[:, None], -jnp.inf, logits_BxV)
  likely = jax.nn.logsumexp(others, axis=-1) - lse
  unlikely = jnp.log1p(-jnp.exp(jnp.minimum(logp, -math.log(2.0))))
  return jnp.where(logp < -math.log(2.0), unlikely, likely)


def injection_loss_sum(logits_BxV: jax.Array, target_ids_B: jax.Array) -> jax.Array:
  """Sum over rows of CE toward `target_ids_B` (rows with id -1 ignored)."""
  return -jnp.sum(answer_logprobs(logits_BxV, target_ids_B))


def unlearning_loss_sum(
    logits_BxV: jax.Array, true_ids_B: jax.Array, logprob_floor: float = -5.0
) -> tuple[jax.Array, jax.Array]:
  """Sum over rows of -log(1 - p(true)), and the number of rows counted.

  Rows whose log p(true) is below `logprob_floor` (already forgotten) or whose id is
  -1 contribute 0. The step divides by the number of rows, not the number kept, so
  the loss is exactly additive over micro-batches and does not jump in scale as
  examples drop out.
  """
  logp = jax.lax.stop_gradient(answer_logprobs(logits_BxV, true_ids_B))
  keep = (true_ids_B >= 0) & (logp >= logprob_floor)
  per_row = -log_one_minus_prob(logits_BxV, true_ids_B)
  return jnp.sum(jnp.where(keep, per_row, 0.0)), jnp.sum(keep)


def lm_loss_sum(
    logits_BxLxV: jax.Array, tokens_BxL: jax.Array, positions_BxL: jax.Array
) -> jax.Array:
  """Sum of next-token CE over every position whose token and next token are real.

  Every column is scored, the last one against a dummy target and masked out: slicing
  the [B, L, V] logits to L - 1 columns would copy them (and pad them back in the
  backward pass).
  """
  tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
  positions_BxL = jnp.asarray(positions_BxL)
  targets = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros_like(tokens_BxL[:, :1])], axis=1)
  real = positions_BxL >= 0
  valid = jnp.concatenate([real[:, :-1] & real[:, 1:], jnp.zeros_like(real[:, :1])], axis=1)
  return jnp.sum(jnp.where(valid, softmax_cross_entropy(logits_BxLxV, targets), 0.0))


def lm_token_count(positions_BxL) -> jax.Array:
  """Number of tokens `lm_loss_sum` scores."""
  positions_BxL = jnp.asarray(positions_BxL)
  return jnp.sum((positions_BxL[..., :-1] >= 0) & (positions_BxL[..., 1:] >= 0))



def fact_last_logits(model: Any, facts: FactBatch) -> jax.Array:
  """Logits [B, V] at each fact's last column, running a shared prefix once if present."""
  if facts.prefix_BxP is None:
    return forward.last_logits(model, facts.tokens_BxL, facts.positions_BxL)
  if not iv.shares_prefixes(model):
    raise ValueError(
        f"a {type(model).__name__} cannot run fact batches with a shared prefix (it changes the"
        " columns the prefix belongs to); draw batches with make_batch_fn(..., share_prefix=False)"
    )
  return iv.last_logits_with_prefix(model, facts.prefix_BxP[0], facts.tokens_BxL, facts.positions_BxL)


@dataclasses.dataclass(frozen=True)
class EditLoss:
  """L = c_f * forget + c_m * maintain + c_r * retain on `trainable.bind(params)`.

  Generic over trainables: the model is whatever `bind` returns (a masked split, LoRA
  adapters, a soft prompt), run in `config.compute_dtype`. Facts are scored with
  `forward.last_logits` (the 262k-way unembedding only at the answer position);
  retain text with `forward.full_logits` (every position).
  """

  config: EditConfig
  # Fact batches may carry a shared prefix (`batch.share_prefix`): run once per
  # micro-batch against every row (`make_batch_fn(..., share_prefix=True)`).
  supports_shared_prefix = True

  def normalizers(self, batch: EditBatch) -> dict[str, jax.Array]:
    """Whole-step example counts (facts) and predicted-token count (retain text)."""
    norms = {}
    for name in ("forget", "maintain"):
      facts = getattr(batch, name)
      if facts is not None:
        norms[name] = jnp.maximum(jnp.sum(jnp.asarray(facts.answer_ids_B) >= 0), 1)
    if batch.retain is not None:
      norms["retain"] = jnp.maximum(lm_token_count(batch.retain.positions_BxL), 1)
    return norms

  def __call__(self, params, trainable, batch: EditBatch, rng, normalizers):
    """(loss, metrics) of one micro-batch, divided by whole-step `normalizers`."""
    del rng  # deterministic losses
    cfg = self.config
    model = trainable.bind(params, cfg.compute_dtype)
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    if batch.forget is not None:
      f = batch.forget
      logits = fact_last_logits(model, f)
      n = normalizers["forget"]
      if cfg.forget_loss == "inject":
        forget = injection_loss_sum(logits, f.answer_ids_B) / n
      else:
        loss_sum, kept = unlearning_loss_sum(logits, f.answer_ids_B, cfg.unlearn_logprob_floor)
        forget = loss_sum / n
        metrics["forget_kept_frac"] = kept / n
      metrics["forget_loss"] = forget
      metrics["forget_prob"] = _mean_prob(logits, f.answer_ids_B, n)
      total += cfg.forget_coef * forget
    if batch.maintain is not None:
      m = batch.maintain
      logits = fact_last_logits(model, m)
      maintain = injection_loss_sum(logits, m.answer_ids_B) / normalizers["maintain"]
      metrics["maintain_loss"] = maintain
      metrics["maintain_prob"] = _mean_prob(logits, m.answer_ids_B, normalizers["maintain"])
      total += cfg.maintain_coef * maintain
    if batch.retain is not None:
      r = batch.retain
      logits = forward.full_logits(model, r.tokens_BxL, r.positions_BxL)
      retain = lm_loss_sum(logits, r.tokens_BxL, r.positions_BxL) / normalizers["retain"]
      metrics["retain_loss"] = retain
      total += cfg.retain_coef * retain
    metrics["loss"] = total
    return total, metrics


def _mean_prob(logits_BxV, ids_B, n):
  logp = jax.lax.stop_gradient(answer_logprobs(logits_BxV, ids_B))
  return jnp.sum(jnp.where(ids_B >= 0, jnp.exp(logp), 0.0)) / n

