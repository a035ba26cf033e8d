"""Localized editing and unlearning: losses, masked optimizer, the jitted step, the loop.

METHOD §3. Only the parameters a localization selects are trained:

- A `ParamMask` (label -> bool, or a bool array of the parameter's shape in its
  named-shape order) must cover every parameter label. Labels whose mask is all False
  are *frozen*: they are inputs of the step that are never differentiated, so a
  localized step pays neither for their gradients (in particular no [vocab, embedding]
  gradient of the tied embedding is ever formed) nor for their optimizer state.
  `optax.masked` is deliberately not used: it passes unmasked leaves through
  untouched, i.e. the raw gradient would be applied to frozen weights.
- Labels with a sub-tensor mask (heads, neurons) are trained as whole tensors whose
  gradients and updates are multiplied elementwise by the mask. Their Adam state
  covers the whole tensor (zero moments on frozen entries), and the update mask is
  applied after weight decay too, so frozen entries stay bitwise unchanged.

One pure, module-level step `train_step(state, batch, rng, frozen, update_mask, *,
loss_fn, config)` serves every trainable pytree and loss: `loss_fn` is a hashable
object with `normalizers(batch)` and `__call__(trainable, frozen, micro_batch, rng,
normalizers)`, so relearning (LoRA, full rank) and soft-prompt attacks can reuse the
step with their own trainable pytree and loss. Loss terms are *sums* divided by
normalizers computed from the whole step batch (number of examples, number of
predicted tokens), so accumulating gradients over micro-batches gives exactly the
full-batch gradient.

Batches are left-padded (`models/forward.py`): a fact's answer is predicted at column
-1. Step batches carry a leading micro-batch axis: every leaf is [M, b, ...].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from penzai import pz

from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models import forward
from mech_unlearn_jax.models.transformer import CausalLM, TokenEmbeddingLookup, parameters_by_label

# label -> bool (whole tensor) or bool array of the parameter's named-shape order.
ParamMask = Mapping[str, Any]


# ----------------------------------------------------------------------------------
# Configuration and batches.


@dataclasses.dataclass(frozen=True)
class EditConfig:
  """Hyperparameters of an edit (hashable: a static argument of the jitted step).

  Attributes:
    num_steps: optimizer steps; the cosine schedule decays to 0 over them.
    learning_rate: peak learning rate.
    warmup_steps: linear warmup from 0 (part of `num_steps`).
    weight_decay: AdamW decoupled weight decay (reference: 0).
    clip_norm: global gradient-norm clip (None: no clipping).
    adam_b1, adam_b2, adam_eps: Adam moments.
    forget_loss: "inject" (CE toward the forget batch's `answer_ids_B`, the edit
      targets) or "unlearn" (-log(1 - p(answer)), `answer_ids_B` = true answers).
    forget_coef, maintain_coef, retain_coef: c_f, c_m, c_r of
      L = c_f * forget + c_m * maintain + c_r * retain.
    unlearn_logprob_floor: "unlearn" ignores examples with log p(true) below this.
    forget_batch_size, maintain_batch_size, retain_batch_size: examples per term per
      step (clamped to the pool size by `make_batch_fn`).
    num_microbatches: gradient accumulation over this many micro-batches per step
      (bounds memory; every batch size must be divisible by it).
    compute_dtype: "float32" or "bfloat16"; master weights and optimizer state stay
      float32, weights and activations are cast inside the loss.
    seed: data order and step rng are pure functions of (seed, step).
    checkpoint_every: save every this many steps (0: only at the end) when a
      checkpoint directory is given.
  """

  num_steps: int = 50
  learning_rate: float = 1e-5
  warmup_steps: int = 0
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  forget_loss: Literal["inject", "unlearn"] = "inject"
  forget_coef: float = 1.0
  maintain_coef: float = 1.0
  retain_coef: float = 1.0
  unlearn_logprob_floor: float = -5.0
  forget_batch_size: int = 64
  maintain_batch_size: int = 64
  retain_batch_size: int = 64
  num_microbatches: int = 1
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  seed: int = 0
  checkpoint_every: int = 0

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"EditConfig.num_steps must be >= 1, got {self.num_steps}")
    if not 0 <= self.warmup_steps < self.num_steps:
      raise ValueError(
          f"EditConfig.warmup_steps must be in [0, num_steps={self.num_steps}), got"
          f" {self.warmup_steps}"
      )
    if self.forget_loss not in ("inject", "unlearn"):
      raise ValueError(
          f"EditConfig.forget_loss must be 'inject' or 'unlearn', got {self.forget_loss!r}"
      )
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(
          f"EditConfig.compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}"
      )
    if self.num_microbatches < 1:
      raise ValueError(f"EditConfig.num_microbatches must be >= 1, got {self.num_microbatches}")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "EditConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ValueError(f"EditConfig JSON has unknown fields {unknown}")
    return cls(**data)


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


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
  """Reshapes every leaf [B, ...] -> [M, B / M, ...] (the step's input layout)."""

  def split(path, x):
    x = np.asarray(x)
    if x.shape[0] % num_microbatches:
      raise ValueError(
          f"batch field {jax.tree_util.keystr(path)} has {x.shape[0]} rows, not divisible"
          f" by num_microbatches={num_microbatches}"
      )
    return x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:])

  return jax.tree_util.tree_map_with_path(split, batch)


# ----------------------------------------------------------------------------------
# Trainable / frozen split.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FrozenModel:
  """Everything the loss needs besides the trainable leaves.

  Attributes:
    unbound: the model with parameter slots (`pz.unbind_params(model, freeze=True)`).
    frozen_values: label -> named value of every frozen parameter (never
      differentiated: they enter the step as plain inputs).
    trainable_axes: static (label, axis names) of every trainable label, used to
      re-tag the positional trainable arrays.
  """

  unbound: Any
  frozen_values: dict[str, pz.nx.NamedArray]
  trainable_axes: tuple[tuple[str, tuple[str, ...]], ...] = dataclasses.field(
      metadata={"static": True}
  )

  def bind(self, trainable: Mapping[str, jax.Array], compute_dtype: str = "float32") -> CausalLM:
    """The model with `trainable` (label -> positional array) filled in."""
    axes = dict(self.trainable_axes)
    values = [pz.ParameterValue(label=k, value=v) for k, v in self.frozen_values.items()]
    values += [
        pz.ParameterValue(label=k, value=pz.nx.wrap(trainable[k]).tag(*axes[k])) for k in axes
    ]
    unbound = self.unbound
    if compute_dtype != "float32":
      values = _cast_floating(values, jnp.dtype(compute_dtype))
      # Model constants (embedding scale, RoPE-free rescales, mask values) are cast
      # too, or float32 constants would promote every activation back to float32.
      unbound = _cast_floating(unbound, jnp.dtype(compute_dtype))
    return pz.bind_variables(unbound, values)


# The model's own row-gather lookup (no per-call copy of the embedding table);
# `split_model` still swaps it in, so models built elsewhere get it too.
RowGatherEmbeddingLookup = TokenEmbeddingLookup


def _cast_floating(tree: Any, dtype) -> Any:
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
  )


def check_mask(mask: ParamMask, shapes: Mapping[str, Mapping[str, int]]) -> dict[str, np.ndarray]:
  """Validates a mask against label -> named shape; returns label -> bool array.

  Whole-tensor entries become 0-d arrays. Raises ValueError naming missing or unknown
  labels and any sub-tensor mask of the wrong shape or dtype.
  """
  missing = sorted(set(shapes) - set(mask))
  unknown = sorted(set(mask) - set(shapes))
  if missing or unknown:
    raise ValueError(
        f"parameter mask must cover every parameter label exactly; missing labels {missing},"
        f" unknown labels {unknown}"
    )
  out = {}
  for label, named in shapes.items():
    m = np.asarray(mask[label])
    if m.dtype != np.bool_:
      raise ValueError(f"mask for {label} must be bool, got dtype {m.dtype}")
    want = tuple(named.values())
    if m.ndim and m.shape != want:
      raise ValueError(
          f"mask for {label} has shape {m.shape}, expected () or {want} (axes {tuple(named)})"
      )
    out[label] = m
  return out


def _named_shapes(model: CausalLM) -> dict[str, dict[str, int]]:
  return {label: dict(p.value.named_shape) for label, p in parameters_by_label(model).items()}


def split_model(
    model: CausalLM, mask: ParamMask
) -> tuple[dict[str, jax.Array], FrozenModel, dict[str, jax.Array] | None]:
  """Splits a model into (trainable arrays, frozen part, update mask or None).

  Trainable arrays are positional (axes in named-shape order) and *copies*, so that
  donating the train state never invalidates the caller's model. The update mask is
  None when every trainable label is trained whole; otherwise it maps every trainable
  label to a bool array (0-d for whole tensors) that gradients and updates are
  multiplied by.
  """
  params = parameters_by_label(model)
  shapes = _named_shapes(model)
  masks = check_mask(mask, shapes)
  trainable_labels = [label for label in params if masks[label].any()]
  if not trainable_labels:
    raise ValueError("parameter mask selects no parameter: nothing to train")
  unbound, values = pz.unbind_params(model, freeze=True)
  unbound = (
      pz.select(unbound)
      .at_instances_of(pz.nn.EmbeddingLookup)
      .apply(lambda layer: RowGatherEmbeddingLookup(table=layer.table))
  )
  values = {v.label: v.value for v in values}
  trainable = {
      label: jnp.array(values[label].unwrap(*shapes[label]), copy=True)
      for label in trainable_labels
  }
  frozen = FrozenModel(
      unbound=unbound,
      frozen_values={k: v for k, v in values.items() if k not in trainable},
      trainable_axes=tuple((label, tuple(shapes[label])) for label in trainable_labels),
  )
  partial_labels = [label for label in trainable_labels if masks[label].ndim and not masks[label].all()]
  update_mask = None
  if partial_labels:
    update_mask = {
        label: jnp.asarray(masks[label] if label in partial_labels else np.bool_(True))
        for label in trainable_labels
    }
  return trainable, frozen, update_mask


def merge_trainable(model: CausalLM, trainable: Mapping[str, jax.Array]) -> CausalLM:
  """A copy of `model` whose parameters named in `trainable` are replaced."""
  unbound, values = pz.unbind_params(model, freeze=True)
  new = []
  for v in values:
    if v.label in trainable:
      value = pz.nx.wrap(jnp.asarray(trainable[v.label])).tag(*v.value.named_shape)
      new.append(pz.Parameter(value=value, label=v.label))
    else:
      new.append(pz.Parameter(value=v.value, label=v.label))
  return pz.bind_variables(unbound, new)


# ----------------------------------------------------------------------------------
# Losses (sums; the step divides by whole-batch normalizers).


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


def lm_loss_sum(logits_BxLxV: jax.Array, tokens_BxL: jax.Array, positions_BxL: jax.Array) -> jax.Array:
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


class StepLoss(Protocol):
  """What `train_step` needs from a loss (must be hashable: a static jit argument)."""

  def normalizers(self, batch: Any) -> Any:
    """Whole-step normalizers from the [M, b, ...] batch (no parameters involved)."""

  def __call__(self, trainable: Any, frozen: Any, batch: Any, rng: jax.Array, normalizers: Any
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss contribution, metric contributions) of one micro-batch; both sum over
    micro-batches to whole-step values."""


@dataclasses.dataclass(frozen=True)
class EditLoss:
  """L = c_f * forget + c_m * maintain + c_r * retain on a masked `FrozenModel`.

  Facts are scored with `forward.last_logits` (the 262k-way unembedding only at the
  answer position); retain text with `forward.full_logits` (every position).
  """

  config: EditConfig

  def normalizers(self, batch: EditBatch) -> dict[str, jax.Array]:
    norms = {}
    for name in ("forget", "maintain"):
      facts = getattr(batch, name)
      if facts is not None:
        norms[name] = jnp.maximum(jnp.sum(jnp.asarray(facts.answer_ids_B) >= 0), 1)
    if batch.retain is not None:
      norms["retain"] = jnp.maximum(lm_token_count(batch.retain.positions_BxL), 1)
    return norms

  def __call__(self, trainable, frozen: FrozenModel, batch: EditBatch, rng, normalizers):
    del rng  # deterministic losses
    cfg = self.config
    model = frozen.bind(trainable, cfg.compute_dtype)
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    if batch.forget is not None:
      f = batch.forget
      logits = forward.last_logits(model, f.tokens_BxL, f.positions_BxL)
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
      logits = forward.last_logits(model, m.tokens_BxL, m.positions_BxL)
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


# ----------------------------------------------------------------------------------
# Optimizer, state and the step.


def make_optimizer(config: EditConfig) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW with (warmup +) cosine decay to 0 over num_steps."""
  if config.warmup_steps:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.num_steps, end_value=0.0
    )
  else:
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.num_steps, alpha=0.0)
  parts = []
  if config.clip_norm:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(
      optax.adamw(
          schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
          weight_decay=config.weight_decay,
      )
  )
  return optax.chain(*parts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """step (int32 scalar), trainable pytree, optimizer state (trainable leaves only)."""

  step: jax.Array
  params: Any
  opt_state: Any


def init_state(trainable: Any, config: EditConfig) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=trainable,
      opt_state=make_optimizer(config).init(trainable),
  )


def abstract_state(trainable: Any, config: EditConfig) -> TrainState:
  """Shapes and dtypes of the train state, without allocating (restore targets)."""
  return jax.eval_shape(functools.partial(init_state, config=config), trainable)


def _apply_mask(tree, update_mask):
  if update_mask is None:
    return tree
  return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), tree, update_mask)


def accumulate_gradients(
    params: Any, frozen: Any, batch: Any, rng: jax.Array, loss_fn: StepLoss
) -> tuple[Any, dict[str, jax.Array]]:
  """Sum over micro-batches (leading axis of every batch leaf) of the loss gradient.

  Because each micro-batch loss is divided by whole-step normalizers, the sum is the
  gradient of the whole-step loss. Gradients are taken only w.r.t. `params`.
  """
  normalizers = loss_fn.normalizers(batch)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  num_micro = jax.tree.leaves(batch)[0].shape[0]

  def micro(grad_sum, xs):
    index, micro_batch = xs
    (_, metrics), grads = grad_fn(params, frozen, micro_batch, jax.random.fold_in(rng, index), normalizers)
    return jax.tree.map(jnp.add, grad_sum, grads), metrics

  if num_micro == 1:
    # Nothing to accumulate: skip the scan.
    (_, metrics), grads = grad_fn(
        params, frozen, jax.tree.map(lambda x: x[0], batch), jax.random.fold_in(rng, 0), normalizers
    )
    return grads, metrics
  # Metrics leave the scan as stacked outputs, so the carry's structure is just the
  # gradient's and the loss is traced only once.
  grads, metrics = jax.lax.scan(
      micro, jax.tree.map(jnp.zeros_like, params), (jnp.arange(num_micro), batch)
  )
  return grads, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)


@functools.partial(jax.jit, static_argnames=("loss_fn", "config"), donate_argnames=("state",))
def train_step(
    state: TrainState,
    batch: Any,
    rng: jax.Array,
    frozen: Any,
    update_mask: Any,
    *,
    loss_fn: StepLoss,
    config: EditConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the trainable leaves; `state` is donated.

  Bind everything but (state, batch, rng) with `functools.partial` to get the
  `(state, batch, rng) -> (state, metrics)` step. `update_mask` (same structure as
  the trainable pytree, bool leaves, or None) zeroes gradients and updates of frozen
  entries inside partially trainable tensors.
  """
  rng = jax.random.fold_in(rng, state.step)
  grads, metrics = accumulate_gradients(state.params, frozen, batch, rng, loss_fn)
  grads = _apply_mask(grads, update_mask)
  updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
  # Weight decay and Adam's epsilon would otherwise move frozen entries.
  updates = _apply_mask(updates, update_mask)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ----------------------------------------------------------------------------------
# Data order and the loop.


@dataclasses.dataclass(frozen=True)
class EditData:
  """Example pools from which `make_batch_fn` draws each step's batch."""

  forget: FactBatch | None = None
  maintain: FactBatch | None = None
  retain: TextBatch | None = None


def _draw(pool: Any, size: int, seed: int, term: int, step: int) -> Any:
  """Rows step*size .. (step+1)*size - 1 of an endless sequence of seeded epochs.

  Each epoch is a permutation seeded by (seed, term, epoch), so the rows of a step are
  a pure function of (seed, step): a resumed run sees the data an uninterrupted one
  would.
  """
  n = jax.tree.leaves(pool)[0].shape[0]
  rows = []
  for k in range(step * size, (step + 1) * size):
    epoch, offset = divmod(k, n)
    perm = _epoch_permutation(seed, term, epoch, n)
    rows.append(perm[offset])
  index = np.asarray(rows)
  return jax.tree.map(lambda x: np.asarray(x)[index], pool)


@functools.lru_cache(maxsize=64)
def _epoch_permutation(seed: int, term: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, term, epoch]).permutation(n)


def make_batch_fn(data: EditData, config: EditConfig) -> Callable[[int], EditBatch]:
  """step -> EditBatch ([M, b, ...] leaves); batch sizes are clamped to pool sizes."""
  sizes = {}
  for term, name in enumerate(("forget", "maintain", "retain")):
    pool = getattr(data, name)
    if pool is None:
      continue
    n = jax.tree.leaves(pool)[0].shape[0]
    size = min(getattr(config, f"{name}_batch_size"), n)
    if size % config.num_microbatches:
      raise ValueError(
          f"{name} batch of {size} examples (EditConfig.{name}_batch_size clamped to the"
          f" pool of {n}) is not divisible by num_microbatches={config.num_microbatches}"
      )
    sizes[name] = (term, size)

  def batch_fn(step: int) -> EditBatch:
    parts = {
        name: split_microbatches(
            _draw(getattr(data, name), size, config.seed, term, step), config.num_microbatches
        )
        for name, (term, size) in sizes.items()
    }
    return EditBatch(**parts)

  return batch_fn


@dataclasses.dataclass
class EditResult:
  """What `train` returns: the edited model, the final state, per-step metrics."""

  model: CausalLM
  state: TrainState
  history: list[dict[str, float]]


def _default_log(step: int, metrics: Mapping[str, float]) -> None:
  text = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
  print(f"step {step}: {text}", flush=True)


def train(
    model: CausalLM,
    mask: ParamMask,
    data: EditData | Callable[[int], EditBatch],
    config: EditConfig,
    *,
    checkpoint_dir: str | None = None,
    model_spec: str = "",
    data_split: Mapping[str, Any] | None = None,
    log_fn: Callable[[int, Mapping[str, float]], None] | None = _default_log,
    loss_fn: StepLoss | None = None,
    max_checkpoints_to_keep: int | None = 2,
) -> EditResult:
  """Trains the masked parameters of `model`; resumes from `checkpoint_dir` if it holds one.

  Args:
    model: the unedited model (not modified: trainable leaves are copied).
    mask: label -> bool or bool array, covering every parameter label.
    data: example pools (batches drawn by `make_batch_fn`) or a function
      step -> EditBatch that must be a pure function of the step for resumption.
    config: the edit's hyperparameters.
    checkpoint_dir: orbax workdir; checkpoints every `config.checkpoint_every` steps
      and at the end; the latest step there is resumed automatically.
    model_spec: how to reload the base model (recorded with the checkpoint).
    data_split: JSON-serializable description of the data (recorded).
    log_fn: called as log_fn(step, metrics) one step late (so dispatch stays
      asynchronous), with `step` counting completed steps; None to disable.
    loss_fn: defaults to `EditLoss(config)`.
    max_checkpoints_to_keep: older steps are deleted (None keeps all); resuming
      needs only the latest.

  Returns:
    EditResult with the edited model (a copy), final state and metric history.
  """
  from mech_unlearn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top

  loss_fn = loss_fn or EditLoss(config)
  batch_fn = data if callable(data) else make_batch_fn(data, config)
  trainable, frozen, update_mask = split_model(model, mask)
  checked_mask = check_mask(mask, _named_shapes(model))
  manager = None
  state = None
  if checkpoint_dir is not None:
    manager = ckpt.EditCheckpointManager(checkpoint_dir, max_to_keep=max_checkpoints_to_keep)
    meta = ckpt.run_metadata(
        model_config=model.config, model_spec=model_spec, edit_config=config, data_split=data_split
    )
    if manager.latest_step() is not None:
      state = manager.restore(abstract_state(trainable, config), mask=checked_mask, expected_meta=meta)
  if state is None:
    state = init_state(trainable, config)
  # Restored arrays are committed to a device and fresh ones are not; jit keys its
  # executable cache on that, so commit both ways or a resumed run recompiles.
  state = jax.device_put(state, jax.devices()[0])
  del trainable  # owned by the (donated) state now
  rng = jax.random.key(config.seed)
  step_fn = functools.partial(
      train_step, frozen=frozen, update_mask=update_mask, loss_fn=loss_fn, config=config
  )
  history: list[dict[str, float]] = []
  pending = None

  def flush(item):
    step, metrics = item
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    history.append(dict(values, step=step))
    if log_fn is not None:
      log_fn(step, values)

  start = int(state.step)
  try:
    for step in range(start, config.num_steps):
      state, metrics = step_fn(state, batch_fn(step), rng)
      if pending is not None:
        flush(pending)  # the previous step's metrics; this step is already queued
      pending = (step + 1, metrics)
      done = step + 1
      if manager is not None and (
          done == config.num_steps or (config.checkpoint_every and done % config.checkpoint_every == 0)
      ):
        manager.save(done, state, mask=checked_mask, meta=meta)
    if pending is not None:
      flush(pending)
  finally:
    if manager is not None:
      manager.close()
  edited = merge_trainable(model, state.params)
  return EditResult(model=edited, state=state, history=history)


def optimizer_state_bytes(opt_state: Any) -> int:
  """Bytes held by optimizer-state arrays."""
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(opt_state)))
