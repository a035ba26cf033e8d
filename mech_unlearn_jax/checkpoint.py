"""Orbax checkpoints of an edit: trained leaves, optimizer state, step, mask, metadata.

A checkpoint holds only what the edit changed, plus what is needed to rebuild the
rest: the trained leaves and their optimizer state (`state`), the parameter mask as
bool arrays (`mask`, 0-d for whole tensors) and JSON metadata (`meta`: the base
model's spec string and config, the edit config, the data split, the mask's
shapes). Frozen weights are never written: they come from the base model.

Restores go into `jax.ShapeDtypeStruct` targets derived with `jax.eval_shape`, so
shapes and dtypes are checked before any bytes are read. Orbax writes each step to a
temporary directory and renames it when complete, so a killed run leaves either a
whole checkpoint or none; `train` resumes from the latest step automatically.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mech_unlearn_jax import edit
from mech_unlearn_jax.models.config import TransformerConfig
from mech_unlearn_jax.models.loaders import config_to_json

FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
  """A checkpoint does not belong to the run that tries to resume from it."""


def run_metadata(
    *,
    model_config: TransformerConfig,
    model_spec: str,
    edit_config: edit.EditConfig,
    data_split: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The JSON record saved with every checkpoint (normalized through JSON)."""
  meta = {
      "format_version": FORMAT_VERSION,
      "model": {"spec": model_spec, "config": config_to_json(model_config)},
      "edit_config": edit_config.to_json(),
      "data_split": dict(data_split) if data_split is not None else None,
  }
  try:
    return json.loads(json.dumps(meta))
  except TypeError as e:
    raise TypeError(f"checkpoint metadata (data_split?) is not JSON-serializable: {e}") from None


def _with_sharding(abstract: Any) -> Any:
  """Adds a single-device sharding to every ShapeDtypeStruct (orbax needs one)."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=getattr(s, "sharding", None) or sharding),
      abstract,
  )


def _state_tree(state: edit.TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


class EditCheckpointManager:
  """`ocp.CheckpointManager` over Composite(state, mask, meta) items."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int | None = None):
    self.directory = pathlib.Path(directory).resolve()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "mask", "meta"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(
      self,
      step: int,
      state: edit.TrainState,
      *,
      mask: Mapping[str, np.ndarray],
      meta: Mapping[str, Any],
  ) -> None:
    """Saves asynchronously (arrays are copied to host before this returns)."""
    mask = {k: np.asarray(v, dtype=bool) for k, v in mask.items()}
    meta = dict(meta, step=int(step), mask_shapes={k: list(v.shape) for k, v in mask.items()})
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_state_tree(state)),
            mask=ocp.args.StandardSave(mask),
            meta=ocp.args.JsonSave(meta),
        ),
    )

  def _step_or_latest(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"no checkpoint {'' if step is None else f'for step {step} '}in {self.directory}"
          f" (steps present: {self.all_steps()})"
      )
    return step

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self._step_or_latest(step)
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_mask(self, step: int | None = None) -> dict[str, np.ndarray]:
    step = self._step_or_latest(step)
    meta = self.restore_meta(step)
    target = _with_sharding(
        {k: jax.ShapeDtypeStruct(tuple(s), np.bool_) for k, s in meta["mask_shapes"].items()}
    )
    mask = self._manager.restore(step, args=ocp.args.Composite(mask=ocp.args.StandardRestore(target)))
    return {k: np.asarray(v) for k, v in mask["mask"].items()}

  def restore(
      self,
      target: edit.TrainState,
      *,
      step: int | None = None,
      mask: Mapping[str, np.ndarray] | None = None,
      expected_meta: Mapping[str, Any] | None = None,
  ) -> edit.TrainState:
    """Restores the train state into `target` (e.g. `edit.abstract_state(...)`).

    If `mask` / `expected_meta` are given they must match what was saved (a resumed
    run must be the same run); the error names the differing labels or fields.
    """
    step = self._step_or_latest(step)
    if expected_meta is not None:
      saved = self.restore_meta(step)
      diffs = [
          key for key in ("model", "edit_config", "data_split")
          if saved.get(key) != expected_meta.get(key)
      ]
      if diffs:
        detail = []
        for key in diffs:
          a, b = saved.get(key), expected_meta.get(key)
          if isinstance(a, dict) and isinstance(b, dict):
            fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            detail.append(f"{key} fields {fields}")
          else:
            detail.append(key)
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} was written by a different run:"
            f" {'; '.join(detail)} differ"
        )
    if mask is not None:
      saved_mask = self.restore_mask(step)
      differing = sorted(
          k for k in set(saved_mask) | set(mask)
          if k not in saved_mask or k not in mask
          or not np.array_equal(np.asarray(saved_mask[k], bool), np.asarray(mask[k], bool))
      )
      if differing:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} has a different parameter mask for"
            f" {differing[:8]}{'...' if len(differing) > 8 else ''}"
        )
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_with_sharding(_state_tree(target)))
        ),
    )["state"]
    return edit.TrainState(
        step=restored["step"], params=restored["params"], opt_state=restored["opt_state"]
    )

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "EditCheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def load_edited_model(
    directory: str | pathlib.Path, base_model: Any = None, *, step: int | None = None
) -> tuple[Any, dict[str, Any]]:
  """The base model with a checkpoint's trained leaves; returns (model, meta).

  `base_model` defaults to `load_model(meta["model"]["spec"])`; its config must
  match the one recorded in the checkpoint.
  """
  with EditCheckpointManager(directory) as manager:
    meta = manager.restore_meta(step)
    if base_model is None:
      from mech_unlearn_jax.models.loaders import load_model  # pylint: disable=g-import-not-at-top

      if not meta["model"]["spec"]:
        raise ValueError(f"checkpoint in {directory} records no model spec; pass base_model")
      base_model = load_model(meta["model"]["spec"])
    if json.loads(json.dumps(config_to_json(base_model.config))) != meta["model"]["config"]:
      raise CheckpointMismatchError(
          f"base model config does not match the config recorded in {directory}"
      )
    config = edit.EditConfig.from_json(meta["edit_config"])
    mask = manager.restore_mask(meta["step"])
    trainable, _, _ = edit.split_model(base_model, mask)
    state = manager.restore(edit.abstract_state(trainable, config), step=meta["step"])
  return edit.merge_trainable(base_model, state.params), meta
