"""The training loop: data order, checkpoints, resumption, non-finite stops, callbacks.

`train(params, trainable, data, config, ...)` is generic over what is trained (see
`trainables.py`); `edit(model, mask, data, config, ...)` is the localized edit of
METHOD §3 on top of it.

- Data: `EditData` pools, drawn by `make_batch_fn` as a pure function of (seed, step),
  or any pure function step -> `EditBatch`, so a resumed run sees the data an
  uninterrupted one would.
- Dispatch stays asynchronous: a step's metrics are read after the next step has been
  queued, except where the loop must know the step was good before acting on it
  (before a checkpoint, before a callback, at the end).
- Non-finite metrics (any loss term, the gradient, update or parameter norm) stop the
  run with `NonFiniteError` naming the first bad step and term. The bad state is
  never saved, so the directory keeps the last good checkpoint.
- Every checkpoint carries the metric history, so a resumed run returns all steps.
- Many devices: when the trainable lives on a multi-device mesh (a model placed with
  `sharding.shard_model`) or `mesh` is given, the trained params and their optimizer
  state are placed with the same specs (params already on the mesh keep theirs; new
  ones, e.g. LoRA adapters, are placed by their axis names, FSDP over "data"), the
  frozen values stay where they are (others replicated), every batch is split over
  "data" along its example axis (the micro-batch axis stays whole), and the jitted
  step keeps that placement (`step.sharded_train_step`). Micro-batches whose size
  the "data" axis does not divide are padded with rows that count for nothing
  (answer id -1, text positions -1), so the step computes the unpadded loss.
  Checkpoints restore into targets on the current mesh, whatever mesh wrote them.
  On one device nothing of this happens: the single-device path is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax import progress, sharding
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.batch import share_prefix as share_prefix_of
from mech_unlearn_jax.models.transformer import CausalLM
from mech_unlearn_jax.train import checkpoint as ckpt
from mech_unlearn_jax.train.losses import EditBatch, EditLoss, TextBatch
from mech_unlearn_jax.train.step import (
    EditConfig,
    StepLoss,
    TrainState,
    abstract_state,
    init_state,
    sharded_train_step,
    split_microbatches,
    state_shardings,
    train_step,
)
from mech_unlearn_jax.train.trainables import ParamMask, Trainable, mask_trainable


class NonFiniteError(FloatingPointError):
  """A training step produced a non-finite loss term, gradient or parameter.

  Attributes:
    step: the 1-based number of the first bad step.
    term: the first non-finite metric (loss terms first, then norms).
    metrics: that step's metrics.
  """

  def __init__(self, message: str, *, step: int, term: str, metrics: Mapping[str, float]):
    super().__init__(message)
    self.step = step
    self.term = term
    self.metrics = dict(metrics)


# ----------------------------------------------------------------------------------
# Data order.


@dataclasses.dataclass(frozen=True)
class EditData:
  """Example pools from which `make_batch_fn` draws each step's batch."""

  forget: FactBatch | None = None
  maintain: FactBatch | None = None
  retain: TextBatch | None = None


def _draw(pool: Any, size: int, seed: int, term: int, step: int) -> Any:
  """Rows step*size .. (step+1)*size - 1 of an endless sequence of seeded epochs.

  Each epoch is a permutation seeded by (seed, term, epoch), so the rows of a step are
  a pure function of (seed, step).
  """
  n = jax.tree.leaves(pool)[0].shape[0]
  rows = []
  for k in range(step * size, (step + 1) * size):
    epoch, offset = divmod(k, n)
    rows.append(_epoch_permutation(seed, term, epoch, n)[offset])
  index = np.asarray(rows)
  return jax.tree.map(lambda x: np.asarray(x)[index], pool)


@functools.lru_cache(maxsize=64)
def _epoch_permutation(seed: int, term: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, term, epoch]).permutation(n)


def can_share_prefix(loss_fn: Any, trainable: Trainable, params: Any) -> bool:
  """Whether `make_batch_fn(..., share_prefix=True)` batches suit this training: the
  loss must run a shared prefix, and the bound model must be one that
  `interventions.shares_prefixes` accepts (a plain model, or a soft-prompted one)."""
  return bool(getattr(loss_fn, "supports_shared_prefix", False)) and iv.shares_prefixes(trainable.bind(params))


def make_batch_fn(data: EditData, config: EditConfig, share_prefix: bool = False) -> Callable[[int], EditBatch]:
  """step -> EditBatch ([M, b, ...] leaves); batch sizes are clamped to pool sizes.

  A clamped size that M = `num_microbatches` does not divide (a whole-sport forget set of
  34 facts in 4 micro-batches) is padded with rows that count for nothing (`_PAD_FILLS`),
  so the step's gradient is still the mean over the real rows; other batch types must
  divide evenly.

  share_prefix: the tokens every fact of a pool starts with (e.g. the one-shot
  example) go into `FactBatch.prefix_BxP`, found once per pool so every step has the
  same shapes; only for losses with `supports_shared_prefix` on plain models.
  """
  if share_prefix:
    data = dataclasses.replace(
        data, **{name: share_prefix_of(getattr(data, name)) for name in ("forget", "maintain")
                 if getattr(data, name) is not None}
    )
  sizes = {}
  for term, name in enumerate(("forget", "maintain", "retain")):
    pool = getattr(data, name)
    if pool is None:
      continue
    n = jax.tree.leaves(pool)[0].shape[0]
    size = min(getattr(config, f"{name}_batch_size"), n)
    padded = sharding.padded_size(size, config.num_microbatches)
    if padded != size and type(pool) not in _PAD_FILLS:
      raise ValueError(
          f"{name} batch of {size} examples (EditConfig.{name}_batch_size clamped to the"
          f" pool of {n}) is not divisible by num_microbatches={config.num_microbatches},"
          f" and a {type(pool).__name__} has no padding rows"
      )
    sizes[name] = (term, size, padded)

  def batch_fn(step: int) -> EditBatch:
    parts = {}
    for name, (term, size, padded) in sizes.items():
      rows = _draw(getattr(data, name), size, config.seed, term, step)
      parts[name] = split_microbatches(_pad_part(rows, padded, axis=0), config.num_microbatches)
    return EditBatch(**parts)

  return batch_fn


# How a padding row of each batch type is marked (field -> fill value): such rows
# count for nothing in `EditLoss` (facts: answer id -1; text: positions -1).
_PAD_FILLS = {
    FactBatch: {"answer_ids_B": -1},
    TextBatch: {"positions_BxL": -1, "tokens_BxL": 0},
}


def _pad_part(part: Any, size: int, axis: int) -> Any:
  """A fact or text batch with its rows (along `axis`) padded to `size` by rows that
  count for nothing; unchanged when it has `size` rows already."""
  if np.shape(jax.tree.leaves(part)[0])[axis] == size:
    return part
  fills = _PAD_FILLS[type(part)]
  return type(part)(**{
      f.name: None if getattr(part, f.name) is None
      else sharding.pad_rows(getattr(part, f.name), size, axis=axis, fill=fills.get(f.name))
      for f in dataclasses.fields(part)
  })


# ----------------------------------------------------------------------------------
# Placement on a multi-device mesh.


def _check_divisible(batch: Any, multiple: int) -> None:
  sizes = {jax.tree_util.keystr(p): np.shape(x)[1] for p, x in jax.tree_util.tree_leaves_with_path(batch)}
  bad = {k: b for k, b in sizes.items() if b % multiple}
  if bad:
    raise ValueError(
        f"batch rows per micro-batch {bad} are not divisible by the mesh's data axis ({multiple}),"
        " and this batch type has no padding rows: set the batch sizes (config.edit.*_batch_size)"
        f" to multiples of {multiple} x num_microbatches, or change config.mesh.data"
    )


def _pad_micro_batches(batch: Any, multiple: int) -> Any:
  """Pads every [M, b, ...] part of an `EditBatch` to b % multiple == 0."""
  if not isinstance(batch, EditBatch):
    _check_divisible(batch, multiple)
    return batch
  parts = {}
  for name in ("forget", "maintain", "retain"):
    part = getattr(batch, name)
    if part is None or type(part) not in _PAD_FILLS:
      if part is not None:
        _check_divisible(part, multiple)
      parts[name] = part
      continue
    size = sharding.padded_size(np.shape(jax.tree.leaves(part)[0])[1], multiple)
    parts[name] = _pad_part(part, size, axis=1)
  return EditBatch(**parts)


def _place_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Pads and splits an [M, b, ...] step batch over "data" along b."""
  batch = _pad_micro_batches(batch, sharding.data_size(mesh))
  return jax.tree.map(lambda x: sharding.put(x, sharding.batch_sharding(np.ndim(x), mesh, axis=1)), batch)


def _place_update_mask(update_mask: Any, params: Any, shardings: Any, mesh) -> Any:
  if update_mask is None:
    return None
  # Whole-tensor entries are 0-d (replicated); sub-tensor masks follow their param.
  return jax.tree.map(
      lambda m, p, s: sharding.put(np.asarray(m), s if np.shape(m) == np.shape(p) else sharding.replicated(mesh)),
      update_mask, params, shardings,
  )


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ----------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    params: the trained params (the same arrays as `state.params`).
    state: the final `TrainState`.
    history: one dict of metrics per step (with its 1-based "step"), all steps of
      the run including those done before a resumption.
    trainable: the trainable the params belong to (for `model`).
  """

  params: Any
  state: TrainState
  history: list[dict[str, float]]
  trainable: Trainable | None = None

  @functools.cached_property
  def model(self) -> CausalLM:
    """`trainable.merge(params)`: the concrete trained model (merged once)."""
    if self.trainable is None:
      raise ValueError("this TrainResult has no trainable to merge its params with")
    return self.trainable.merge(self.params)


def print_log(step: int, metrics: Mapping[str, float]) -> None:
  """A `log_fn` printing one line per step."""
  text = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
  print(f"step {step}: {text}", flush=True)


def _term_order(name: str) -> tuple[int, str]:
  # Loss terms first (the likely culprit), then the total, then the norms.
  if name.endswith("_loss"):
    return (0, name)
  order = {"loss": 1, "grad_norm": 2, "update_norm": 3, "param_norm": 4}
  return (order.get(name, 5), name)


def _copy(params: Any) -> Any:
  # The state is donated to the step: train on copies so the caller's arrays (a
  # model's own weights, for a mask trainable) stay valid.
  return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


class _CompiledAhead:
  """The jitted step, compiled before its first run for the first batch's shapes.

  Compiling inside the first call would leave the compiler's freed scratch (~0.35 GiB
  for the 270M model's step) resident under that step's activations, where it adds to
  the run's peak memory; compiling ahead lets it go back to the OS first
  (`progress.release_free_heap`). A batch of other shapes runs through the jitted
  function as usual.
  """

  def __init__(self, step_impl, *, trainable, update_mask, loss_fn, config):
    self._jitted = functools.partial(
        step_impl, trainable=trainable, update_mask=update_mask, loss_fn=loss_fn, config=config
    )
    self._lower = functools.partial(
        step_impl.lower, trainable=trainable, update_mask=update_mask, loss_fn=loss_fn, config=config
    )
    self._dynamic = dict(trainable=trainable, update_mask=update_mask)
    self._compiled = None
    self._signature = None

  @staticmethod
  def _shapes(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves)

  def __call__(self, state, batch, rng):
    signature = self._shapes((state, batch, rng))
    if self._compiled is None:
      self._compiled = self._lower(state, batch, rng).compile()
      self._signature = signature
      progress.release_free_heap()
    if signature != self._signature:
      return self._jitted(state, batch, rng)
    return self._compiled(state, batch, rng, **self._dynamic)


def train(
    params: Any,
    trainable: Trainable,
    data: EditData | Callable[[int], EditBatch],
    config: EditConfig,
    *,
    update_mask: Any = None,
    loss_fn: StepLoss | None = None,
    checkpoint_dir: str | None = None,
    meta: Mapping[str, Any] | None = None,
    log_fn: Callable[[int, Mapping[str, float]], None] | None = None,
    callback: Callable[[int, Any], None] | None = None,
    max_checkpoints_to_keep: int | None = 2,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainResult:
  """Trains `params` of `trainable`; resumes from `checkpoint_dir` if it holds a step.

  Args:
    params: the initial trainable pytree (from a trainable constructor). Not
      consumed: the run trains a copy.
    trainable: binds params into the model inside the loss (`trainables.Trainable`).
    data: example pools (batches drawn by `make_batch_fn`) or a function
      step -> EditBatch that must be a pure function of the step for resumption.
    config: the run's hyperparameters.
    update_mask: elementwise bool mask over params (sub-tensor masks), or None.
    loss_fn: defaults to `EditLoss(config)`.
    checkpoint_dir: orbax workdir; checkpoints every `config.checkpoint_every` steps
      and at the end; the latest step there is resumed automatically, after checking
      it was written by the same run (config, trainable, param shapes, update mask,
      `meta`).
    meta: the caller's JSON record saved with every checkpoint (e.g.
      `checkpoint.edit_metadata(...)`); it must match on resume.
    log_fn: called as log_fn(step, metrics) for every step run here, with `step`
      counting completed steps; metrics are read one step late so dispatch stays
      asynchronous. None: no logging (`print_log` prints).
    callback: called as callback(step_done, params) after every step run here, once
      the step is known to be finite (the loop waits for it). `params` are the live
      state's arrays: use them during the call (e.g. evaluate
      `trainable.merge(params)`); the next step donates them.
    max_checkpoints_to_keep: older steps are deleted (None keeps all).
    mesh: run on this device mesh (see the module docstring); None: the mesh the
      params or the trainable's frozen values live on, if they span several devices,
      else one device.

  Returns:
    TrainResult(params, state, history) with `.model` the merged trained model.

  Raises:
    NonFiniteError: at the first step with a non-finite metric; nothing from that
      step on is saved.
    checkpoint.CheckpointMismatchError: `checkpoint_dir` holds another run.
  """
  loss_fn = loss_fn or EditLoss(config)
  batch_fn = data if callable(data) else make_batch_fn(
      data, config, share_prefix=can_share_prefix(loss_fn, trainable, params)
  )
  run_meta = ckpt.run_metadata(config, trainable, params, meta)
  mesh = mesh if mesh is not None else sharding.mesh_of((params, trainable))
  if not sharding.is_multi_device(mesh):
    mesh = None
  host_mask = None if update_mask is None else jax.tree.map(np.asarray, update_mask)
  target = abstract_state(params, config)
  if mesh is not None:
    # Params already on the mesh keep their placement; new ones (LoRA) are placed by
    # the axis names the trainable knows, FSDP over "data".
    param_shardings = sharding.param_shardings(params, mesh, dict(getattr(trainable, "param_axes", ()) or ()))
    shardings = state_shardings(param_shardings, params, config, sharding.replicated(mesh))
    target = _with_shardings(target, shardings)
    params = jax.tree.map(sharding.put, params, param_shardings)
    trainable = sharding.shard_tree(trainable, mesh)
    update_mask = _place_update_mask(host_mask, params, param_shardings, mesh)
  manager = None
  state = None
  history: list[dict[str, float]] = []
  if checkpoint_dir is not None:
    manager = ckpt.CheckpointManager(checkpoint_dir, max_to_keep=max_checkpoints_to_keep)
    if manager.latest_step() is not None:
      # Restored into `target`: onto this run's mesh, whichever mesh saved it.
      state = manager.restore(target, mask=host_mask, expected_meta=run_meta)
      history = manager.restore_history()
  if mesh is None:
    if state is None:
      state = init_state(_copy(params), config)
    # Restored arrays are committed to a device and fresh ones are not; jit keys its
    # executable cache on that, so commit both ways or a resumed run recompiles.
    state = sharding.commit_to_device(state)
    rng = jax.random.key(config.seed)
    step_impl = train_step
    place_batch = lambda batch: batch
  else:
    if state is None:
      # Allocated in place, sharded (never whole on one device).
      init = jax.jit(functools.partial(init_state, config=config), out_shardings=shardings)
      state = init(_copy(params))
    state = jax.tree.map(sharding.put, state, shardings)
    rng = sharding.put(jax.random.key(config.seed), sharding.replicated(mesh))
    step_impl = sharded_train_step(shardings, sharding.replicated(mesh))
    place_batch = functools.partial(_place_batch, mesh=mesh)
  step_fn = _CompiledAhead(
      step_impl, trainable=trainable, update_mask=update_mask, loss_fn=loss_fn, config=config
  )
  last_saved = manager.latest_step() if manager is not None else None

  def check(step: int, metrics) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    finite = bool(values.pop("finite"))
    bad = sorted((k for k, v in values.items() if not math.isfinite(v)), key=_term_order)
    if not finite or bad:
      term = bad[0] if bad else "metric"
      saved = f"step {last_saved}" if last_saved is not None else "none"
      raise NonFiniteError(
          f"edit step {step}: non-finite {term} (= {values.get(term)}; all non-finite: {bad});"
          f" the state after it was not saved (last good checkpoint: {saved})",
          step=step, term=term, metrics=values,
      )
    history.append(dict(values, step=step))
    if log_fn is not None:
      log_fn(step, values)

  pending = None
  try:
    for step in range(int(state.step), config.steps):
      progress.raise_if_interrupted()
      state, metrics = step_fn(state, place_batch(batch_fn(step)), rng)
      if pending is not None:
        check(*pending)  # the previous step; this one is already queued
      done = step + 1
      pending = (done, metrics)
      every = config.checkpoint_every
      save = manager is not None and (done == config.steps or (every and done % every == 0))
      if save or callback is not None or done == config.steps:
        check(*pending)
        pending = None
      if save:
        manager.save(done, state, mask=host_mask, meta=run_meta, history=history)
        last_saved = done
      if callback is not None:
        callback(done, state.params)
    if pending is not None:
      check(*pending)
  finally:
    if manager is not None:
      manager.close()
  return TrainResult(params=state.params, state=state, history=history, trainable=trainable)


def edit(
    model: CausalLM,
    mask: ParamMask,
    data: EditData | Callable[[int], EditBatch],
    config: EditConfig,
    *,
    checkpoint_dir: str | None = None,
    model_spec: str = "",
    data_split: Mapping[str, Any] | None = None,
    log_fn: Callable[[int, Mapping[str, float]], None] | None = None,
    loss_fn: StepLoss | None = None,
    max_checkpoints_to_keep: int | None = 2,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainResult:
  """Trains the masked parameters of `model` (METHOD §3); `.model` is the edited model.

  Args:
    model: the unedited model (not modified).
    mask: label -> bool or bool array, covering every parameter label
      (`trainables.validate_mask`).
    data, config, checkpoint_dir, log_fn, loss_fn, max_checkpoints_to_keep, mesh: as
      in `train` (a model placed with `sharding.shard_model` trains on its mesh).
    model_spec: how to reload the base model (recorded with checkpoints, used by
      `checkpoint.load_trained_model`).
    data_split: JSON-serializable description of the data (recorded).
  """
  params, trainable, update_mask = mask_trainable(model, mask)
  meta = ckpt.edit_metadata(model_config=model.config, model_spec=model_spec, data_split=data_split)
  return train(
      params, trainable, data, config, update_mask=update_mask, loss_fn=loss_fn,
      checkpoint_dir=checkpoint_dir, meta=meta, log_fn=log_fn,
      max_checkpoints_to_keep=max_checkpoints_to_keep, mesh=mesh,
  )
