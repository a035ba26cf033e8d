"""Orbax checkpoints of a training run: state, update mask, metadata, metric history.

Generic over trainables. A checkpoint step holds four items:
  * `state`: the `TrainState` (step, the trained params, their optimizer state);
    frozen weights are never written, they come from the base model;
  * `mask` (only when the run has an update mask): the bool update mask, flattened to
    path -> array (for a mask trainable, label -> array);
  * `meta`: JSON describing the run (the trainer's config, the trainable's `spec()`,
    path -> [shape, dtype] of every param, and the caller's own record such as the
    base model's spec and config and the data split), plus the step;
  * `history`: every step's metrics up to this step, so a resumed run returns the
    full history.

Restores go into `jax.ShapeDtypeStruct` targets derived with `jax.eval_shape`
(`step.abstract_state`) and carrying the resuming run's shardings (`sharded_target`:
a checkpoint written on one mesh restores onto another, or onto one device), after
checking the saved metadata and mask against the
resuming run, so a different run is refused before any bytes are read
(`CheckpointMismatchError` names the differing fields). Orbax writes each step to a
temporary directory and renames it when complete, so a killed run leaves either a
whole checkpoint or none.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mech_unlearn_jax import sharding as sharding_lib
from mech_unlearn_jax.models.config import TransformerConfig
from mech_unlearn_jax.models.loaders import config_to_json
from mech_unlearn_jax.train import trainables as trainables_lib
from mech_unlearn_jax.train.step import EditConfig, TrainState, abstract_state, state_shardings

FORMAT_VERSION = 2
# Saved-meta keys that describe the checkpoint, not the run (not compared on resume).
_VOLATILE_KEYS = ("step", "mask_shapes")
_UNCHECKED = object()


class CheckpointMismatchError(ValueError):
  """A checkpoint does not belong to the run that tries to resume from it."""


path_str = sharding_lib.path_label  # names of flattened leaves in checkpoints


def flatten(tree: Any) -> dict[str, Any]:
  """Pytree -> {path_str: leaf}."""
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def params_record(params: Any) -> dict[str, list[Any]]:
  """path -> [shape, dtype] of every param leaf (works on arrays or shape structs)."""
  return {k: [list(np.shape(x)), str(np.dtype(x.dtype))] for k, x in flatten(params).items()}


def _json(value: Any, what: str) -> Any:
  try:
    return json.loads(json.dumps(value))
  except TypeError as e:
    raise TypeError(f"checkpoint metadata ({what}) is not JSON-serializable: {e}") from None


def run_metadata(
    config: EditConfig, trainable: Any, params: Any, meta: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """The JSON record a run saves with every checkpoint and must match on resume.

  `meta` (the caller's record) may not use the keys the trainer writes.
  """
  spec = trainable.spec() if hasattr(trainable, "spec") else {"kind": type(trainable).__name__}
  record = {
      "format_version": FORMAT_VERSION,
      "config": config.to_json(),
      "trainable": spec,
      "params": params_record(params),
  }
  clash = sorted((set(meta or {}) & set(record)) | (set(meta or {}) & set(_VOLATILE_KEYS)))
  if clash:
    raise ValueError(f"checkpoint meta keys {clash} are reserved for the trainer")
  return _json({**record, **(meta or {})}, "meta")


def edit_metadata(
    *,
    model_config: TransformerConfig,
    model_spec: str,
    data_split: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The caller's part of an edit's record: how to reload the base model, the data."""
  return _json(
      {
          "model": {"spec": model_spec, "config": config_to_json(model_config)},
          "data_split": dict(data_split) if data_split is not None else None,
      },
      "data_split",
  )


def _with_sharding(abstract: Any) -> Any:
  """Adds a single-device sharding to every ShapeDtypeStruct that has none (orbax
  needs one): this process's first device (the only one of a one-device run)."""
  sharding = jax.sharding.SingleDeviceSharding(sharding_lib.local_device())
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(
          s.shape, s.dtype, sharding=getattr(s, "sharding", None) or sharding
      ),
      abstract,
  )


def sharded_target(params: Any, config: EditConfig, trainable: Any = None) -> TrainState:
  """The restore target of a run training `params`: shapes, dtypes and shardings.

  On a multi-device mesh (the params' or the trainable's), params on the mesh keep
  their sharding, others are placed by the trainable's axis names, and Adam's moments
  follow their params; otherwise the target is single-device (`abstract_state`).
  """
  target = abstract_state(params, config)
  mesh = sharding_lib.mesh_of((params, trainable))
  if mesh is None:
    return target
  axes = dict(getattr(trainable, "param_axes", ()) or ())
  shardings = state_shardings(
      sharding_lib.param_shardings(params, mesh, axes), params, config, sharding_lib.replicated(mesh)
  )
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)


def _state_tree(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  keys = sorted((set(saved) | set(expected)) - set(_VOLATILE_KEYS))
  detail = []
  for key in keys:
    a, b = saved.get(key), expected.get(key)
    if a == b:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      more = "..." if len(fields) > 8 else ""
      detail.append(f"{key} fields {fields[:8]}{more}")
    else:
      detail.append(key)
  return detail


class CheckpointManager:
  """`ocp.CheckpointManager` over Composite(state, mask?, meta, history) items."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int | None = None, read_only: bool = False):
    """Opens (creating if needed) a checkpoint directory; keeps the latest `max_to_keep`.

    read_only: only list and restore, never create, delete or write anything (e.g. to
    look at a run that another process may be writing).
    """
    self.directory = pathlib.Path(directory).resolve()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only),
        item_names=("state", "mask", "meta", "history"),
    )

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every complete step, ascending."""
    return sorted(self._manager.all_steps())

  def save(
      self,
      step: int,
      state: TrainState,
      *,
      mask: Any = None,
      meta: Mapping[str, Any],
      history: Sequence[Mapping[str, float]] = (),
  ) -> None:
    """Saves asynchronously (arrays are copied to host before this returns).

    Args:
      step: the number of completed steps.
      state: the train state after `step` steps.
      mask: the update mask (pytree of bool arrays, or a flat dict), or None.
      meta: `run_metadata(...)`; the step and the mask's shapes are added.
      history: the metrics of steps 1..step.
    """
    flat_mask = None if mask is None else {k: np.asarray(v, bool) for k, v in flatten(mask).items()}
    meta = dict(
        meta, step=int(step),
        mask_shapes=None if flat_mask is None else {k: list(v.shape) for k, v in flat_mask.items()},
    )
    items = dict(
        state=ocp.args.StandardSave(_state_tree(state)),
        meta=ocp.args.JsonSave(meta),
        history=ocp.args.JsonSave({"history": [dict(h) for h in history]}),
    )
    if flat_mask is not None:
      items["mask"] = ocp.args.StandardSave(flat_mask)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def _step_or_latest(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"no checkpoint {'' if step is None else f'for step {step} '}in {self.directory}"
          f" (steps present: {self.all_steps()})"
      )
    return step

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON record of a step (default: the latest)."""
    step = self._step_or_latest(step)
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_history(self, step: int | None = None) -> list[dict[str, float]]:
    """The metric history of steps 1..step."""
    step = self._step_or_latest(step)
    saved = self._manager.restore(step, args=ocp.args.Composite(history=ocp.args.JsonRestore()))
    return list(saved["history"]["history"])

  def restore_mask(self, step: int | None = None) -> dict[str, np.ndarray] | None:
    """The flattened update mask (path -> bool array), or None if the run had none."""
    step = self._step_or_latest(step)
    shapes = self.restore_meta(step)["mask_shapes"]
    if shapes is None:
      return None
    target = _with_sharding(
        {k: jax.ShapeDtypeStruct(tuple(s), np.bool_) for k, s in shapes.items()}
    )
    mask = self._manager.restore(
        step, args=ocp.args.Composite(mask=ocp.args.StandardRestore(target))
    )
    return {k: np.asarray(v) for k, v in mask["mask"].items()}

  def restore(
      self,
      target: TrainState,
      *,
      step: int | None = None,
      mask: Any = _UNCHECKED,
      expected_meta: Mapping[str, Any] | None = None,
  ) -> TrainState:
    """Restores the train state into `target` (e.g. `step.abstract_state(...)`).

    Args:
      target: a state of ShapeDtypeStructs (or arrays) with the expected structure.
      step: which step (default: the latest).
      mask: if given, the resuming run's update mask (or None for none); it must
        equal the saved one.
      expected_meta: if given, the resuming run's `run_metadata`; every field but the
        step must equal the saved one.

    Raises:
      CheckpointMismatchError: naming the differing metadata fields, mask paths or
        param shapes; raised before any array is read.
    """
    step = self._step_or_latest(step)
    saved = self.restore_meta(step)
    where = f"checkpoint step {step} in {self.directory}"
    if expected_meta is not None:
      diffs = _differences(saved, expected_meta)
      if diffs:
        raise CheckpointMismatchError(
            f"{where} was written by a different run: {'; '.join(diffs)} differ"
        )
    if mask is not _UNCHECKED:
      saved_mask = self.restore_mask(step)
      want = None if mask is None else {k: np.asarray(v, bool) for k, v in flatten(mask).items()}
      if (saved_mask is None) != (want is None):
        raise CheckpointMismatchError(
            f"{where} {'has no' if saved_mask is None else 'has an'} update mask, the resuming"
            f" run {'has one' if saved_mask is None else 'has none'}"
        )
      if want is not None:
        differing = sorted(
            k for k in set(saved_mask) | set(want)
            if k not in saved_mask or k not in want or not np.array_equal(saved_mask[k], want[k])
        )
        if differing:
          raise CheckpointMismatchError(
              f"{where} has a different update mask for {differing[:8]}"
              f"{'...' if len(differing) > 8 else ''}"
          )
    shapes = params_record(target.params)
    if shapes != saved["params"]:
      diffs = sorted(
          k for k in set(shapes) | set(saved["params"]) if shapes.get(k) != saved["params"].get(k)
      )
      raise CheckpointMismatchError(f"{where} holds params of other shapes or names: {diffs[:8]}")
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_with_sharding(_state_tree(target)))
        ),
    )["state"]
    return TrainState(
        step=restored["step"], params=restored["params"], opt_state=restored["opt_state"]
    )

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def param_mask_from_checkpoint(
    meta: Mapping[str, Any],
    update_mask: Mapping[str, np.ndarray] | None,
    layout: trainables_lib.Layout,
) -> trainables_lib.ParamMask:
  """The full `ParamMask` a mask-trainable checkpoint was trained with.

  Trained labels are the saved params; partially trained ones carry their update mask.
  """
  if meta["trainable"].get("kind") != "mask":
    raise ValueError(f"checkpoint trained {meta['trainable']}, not a parameter mask")
  trained = set(meta["params"])
  out: trainables_lib.ParamMask = {}
  for label in trainables_lib.named_shapes(layout):
    if label not in trained:
      out[label] = False
    elif update_mask is not None and update_mask[label].ndim:
      out[label] = np.asarray(update_mask[label], bool)
    else:
      out[label] = True
  return out


def load_trained_model(
    directory: str | pathlib.Path, base_model: Any = None, *, step: int | None = None
) -> tuple[Any, dict[str, Any]]:
  """The base model with a checkpoint's trained params merged in -> (model, meta).

  Works for mask and LoRA trainables. `base_model` defaults to
  `load_model(meta["model"]["spec"])`; a model config recorded in the checkpoint
  must match the base model's. The trained params are restored where the base
  model lives (its mesh, or one device), whichever mesh wrote them.
  """
  with CheckpointManager(directory) as manager:
    meta = manager.restore_meta(step)
    recorded = meta.get("model") or {}
    if base_model is None:
      from mech_unlearn_jax.models.loaders import load_model  # pylint: disable=g-import-not-at-top

      if not recorded.get("spec"):
        raise ValueError(f"checkpoint in {directory} records no model spec; pass base_model")
      base_model = load_model(recorded["spec"])
    base_config = _json(config_to_json(base_model.config), "model")
    if "config" in recorded and base_config != recorded["config"]:
      raise CheckpointMismatchError(
          f"base model config does not match the config recorded in {directory}"
      )
    config = EditConfig.from_json(meta["config"])
    spec = meta["trainable"]
    if spec.get("kind") == "mask":
      mask = param_mask_from_checkpoint(meta, manager.restore_mask(meta["step"]), base_model)
      params, trainable, _ = trainables_lib.mask_trainable(base_model, mask)
    elif spec.get("kind") == "lora":
      params, trainable, _ = trainables_lib.lora_trainable(
          base_model, rank=spec["rank"], alpha=spec["alpha"], seed=spec["seed"],
          targets=spec["targets"],
      )
    else:
      raise ValueError(f"cannot rebuild a {spec} trainable from {directory}")
    state = manager.restore(sharded_target(params, config, trainable), step=meta["step"])
  return trainable.merge(state.params), meta


# The name from before the trainer became generic.
load_edited_model = load_trained_model
