"""The jitted training step: config, optimizer, state, gradient accumulation.

One pure, module-level step `train_step(state, batch, rng, trainable, update_mask, *,
loss_fn, config)` serves every trainable (`trainables.py`) and loss: `loss_fn` is a
hashable `StepLoss` with `normalizers(batch)` and `__call__(params, trainable,
micro_batch, rng, normalizers)`. Loss terms are *sums* divided by normalizers computed
from the whole step batch (number of examples, number of predicted tokens), so
accumulating gradients over micro-batches gives exactly the full-batch gradient.

Optimizer state exists for the trainable pytree only; `optax.masked` is deliberately
not used (it passes unmasked leaves through untouched, i.e. the raw gradient would be
applied to frozen weights). Sub-tensor masks multiply gradients *and* updates (after
weight decay) by the elementwise `update_mask`, so frozen entries stay bitwise
unchanged. After the update, `trainable.project` applies the trainable's constraint.

Non-finite values: the step returns a `finite` flag computed in the graph from every
loss metric and the gradient, update and parameter norms (a few reductions), so the
loop can stop at the first bad step without an extra device round trip.

Step batches carry a leading micro-batch axis: every leaf is [M, b, ...].

Many devices: `sharded_train_step(state_shardings(...), replicated)` is the same step
jitted with explicit output shardings, so a state placed on a mesh (params and Adam's
moments with the same specs, see `loop.py`) keeps its placement from step to step;
the inputs arrive placed (`jax.device_put` with `NamedSharding`) and XLA's SPMD
partitioner inserts the collectives. `train_step` itself is the unchanged
single-device step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

@dataclasses.dataclass(frozen=True)
class EditConfig:
  """Hyperparameters of a training run, edit or attack (hashable: static in the step).

  Attributes:
    steps: optimizer steps; the cosine schedule decays to 0 over them.
    lr: peak learning rate.
    warmup_steps: linear warmup from 0 (part of `steps`).
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
      (bounds memory). A fact or text batch it does not divide is padded with rows
      that count for nothing (`loop.make_batch_fn`); other batches must divide.
    compute_dtype: "float32" or "bfloat16"; master weights and optimizer state stay
      float32, weights and activations are cast inside the loss.
    seed: data order and step rng are pure functions of (seed, step).
    checkpoint_every: save every this many steps (0: only at the end) when a
      checkpoint directory is given.
  """

  steps: int = 50
  lr: float = 1e-5
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
    if self.steps < 1:
      raise ValueError(f"EditConfig.steps must be >= 1, got {self.steps}")
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(
          f"EditConfig.warmup_steps must be in [0, steps={self.steps}), got"
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
    """Field name -> value (JSON-serializable)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "EditConfig":
    """Inverse of `to_json`; unknown fields are an error."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ValueError(f"EditConfig JSON has unknown fields {unknown}")
    return cls(**data)



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


class StepLoss(Protocol):
  """What `train_step` needs from a loss (must be hashable: a static jit argument)."""

  def normalizers(self, batch: Any) -> Any:
    """Whole-step normalizers from the [M, b, ...] batch (no parameters involved)."""

  def __call__(self, params: Any, trainable: Any, batch: Any, rng: jax.Array, normalizers: Any
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss contribution, metric contributions) of one micro-batch; both sum over
    micro-batches to whole-step values. The model is `trainable.bind(params, dtype)`."""


def make_optimizer(config: EditConfig) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW with (warmup +) cosine decay to 0 over steps."""
  if config.warmup_steps:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, config.warmup_steps, config.steps, end_value=0.0
    )
  else:
    schedule = optax.cosine_decay_schedule(config.lr, config.steps, alpha=0.0)
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


def init_state(params: Any, config: EditConfig) -> TrainState:
  """Step 0 with fresh optimizer state for `params` (which the state then owns)."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=make_optimizer(config).init(params),
  )


def abstract_state(params: Any, config: EditConfig) -> TrainState:
  """Shapes and dtypes of the train state, without allocating (restore targets)."""
  return jax.eval_shape(functools.partial(init_state, config=config), params)


def _apply_mask(tree, update_mask):
  if update_mask is None:
    return tree
  return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), tree, update_mask)


def accumulate_gradients(
    params: Any, trainable: Any, batch: Any, rng: jax.Array, loss_fn: StepLoss
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
    (_, metrics), grads = grad_fn(
        params, trainable, micro_batch, jax.random.fold_in(rng, index), normalizers
    )
    return jax.tree.map(jnp.add, grad_sum, grads), metrics

  if num_micro == 1:
    # Nothing to accumulate: skip the scan.
    (_, metrics), grads = grad_fn(
        params, trainable, jax.tree.map(lambda x: x[0], batch), jax.random.fold_in(rng, 0),
        normalizers,
    )
    return grads, metrics
  # Metrics leave the scan as stacked outputs, so the carry's structure is just the
  # gradient's and the loss is traced only once.
  grads, metrics = jax.lax.scan(
      micro, jax.tree.map(jnp.zeros_like, params), (jnp.arange(num_micro), batch)
  )
  return grads, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)


def _train_step(
    state: TrainState,
    batch: Any,
    rng: jax.Array,
    trainable: Any,
    update_mask: Any,
    *,
    loss_fn: StepLoss,
    config: EditConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on `state.params`; `state` is donated.

  Bind everything but (state, batch, rng) with `functools.partial` to get the
  `(state, batch, rng) -> (state, metrics)` step. `update_mask` (same structure as
  the params, bool leaves, or None) zeroes gradients and updates of frozen entries
  inside partially trained tensors. Metrics: the loss's, plus `grad_norm` (of the
  masked gradient, before clipping), `update_norm`, `param_norm` (after the update
  and the projection) and `finite` (all of them finite).
  """
  rng = jax.random.fold_in(rng, state.step)
  grads, metrics = accumulate_gradients(state.params, trainable, batch, rng, loss_fn)
  grads = _apply_mask(grads, update_mask)
  updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
  # Weight decay and Adam's epsilon would otherwise move frozen entries.
  updates = _apply_mask(updates, update_mask)
  params = trainable.project(optax.apply_updates(state.params, updates))
  metrics = dict(
      metrics,
      grad_norm=optax.tree.norm(grads),
      update_norm=optax.tree.norm(updates),
      param_norm=optax.tree.norm(params),
  )
  # One scalar per metric: cheap next to the step, and read with the metrics anyway.
  metrics["finite"] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in metrics.values()]))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


_STATIC = ("loss_fn", "config")

train_step = jax.jit(_train_step, static_argnames=_STATIC, donate_argnames=("state",))


@functools.lru_cache(maxsize=32)
def _sharded_step(state_def, state_shardings: tuple[Any, ...], metrics_sharding: Any):
  out = (jax.tree.unflatten(state_def, state_shardings), metrics_sharding)
  return jax.jit(
      _train_step, static_argnames=_STATIC, donate_argnames=("state",), out_shardings=out
  )


def sharded_train_step(state_shardings: TrainState, metrics_sharding: Any):
  """`train_step` whose outputs keep the given placement (multi-device runs).

  The new state comes out with exactly the input state's shardings, so the donated
  buffers are reused and the next step does not recompile; metrics come out with
  `metrics_sharding` (replicated: every process can read them). The jitted function
  is cached per placement, so runs on the same placement share compilations.
  """
  leaves, state_def = jax.tree.flatten(state_shardings)
  return _sharded_step(state_def, tuple(leaves), metrics_sharding)


def state_shardings(
    params_shardings: Any, params: Any, config: EditConfig, scalar_sharding: Any
) -> TrainState:
  """Shardings of a `TrainState`: the optimizer state's copies of the params (Adam's
  moments) take the params' shardings, its scalars (step counts) `scalar_sharding`."""
  abstract = abstract_state(params, config)
  opt = optax.tree_utils.tree_map_params(
      make_optimizer(config), lambda _, s: s, abstract.opt_state, params_shardings,
      transform_non_params=lambda _: scalar_sharding,
  )
  return TrainState(step=scalar_sharding, params=params_shardings, opt_state=opt)


def optimizer_state_bytes(opt_state: Any) -> int:
  """Bytes held by optimizer-state arrays."""
  leaves = jax.tree.leaves(opt_state)
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))
