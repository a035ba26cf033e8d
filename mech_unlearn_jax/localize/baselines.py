"""Baseline localizations (METHOD §2), all seeded and budget-matched to FLU.

  * `flu_mlps`: the fact-lookup MLP units (the budget every other baseline matches).
  * `random_matrices` ("random"): whole attention/MLP weight matrices drawn at random
    until the FLU parameter budget is met (overshoot < one matrix).
  * `random_mlps`: as many random MLP units as FLU has.
  * `all_mlps`: every MLP unit.
  * `nonlocalized`: every attention and MLP matrix.
  * `output_tracing_mlps` ("ap_mlps" / "ct_mlps"): MLP units only, ranked by an
    output-tracing method's scores (reference-mode unit aggregation) at the FLU budget.

Each returns a `masks.MaskResult`, which carries its trained-parameter count. The
`config` argument is a layout (a model or its config; see `masks.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mech_unlearn_jax.localize import masks as masks_lib

MaskResult = masks_lib.MaskResult
BASELINES = ("random", "random_mlps", "all_mlps", "nonlocalized", "ap_mlps", "ct_mlps")


def flu_mlps(config: masks_lib.Layout, layers: Sequence[int]) -> MaskResult:
  """MLP units of the fact-lookup layers."""
  layers = sorted(set(int(i) for i in layers))
  if not layers:
    raise ValueError("FLU needs at least one MLP layer")
  units = [masks_lib.Unit(i, "mlp") for i in layers]
  return MaskResult.make("flu", masks_lib.mask_from_units(config, units), config, layers=layers)


def random_matrices(config: masks_lib.Layout, budget: int, seed: int) -> MaskResult:
  """Random attention/MLP weight matrices until `budget` weights are trained."""
  if budget <= 0:
    raise ValueError(f"budget must be positive, got {budget}")
  labels = masks_lib.editable_labels(config)
  order = np.random.default_rng(seed).permutation(len(labels))
  chosen, total = [], 0
  for i in order:
    if total >= budget:
      break
    chosen.append(labels[i])
    total += int(np.prod(masks_lib.parameter_shape(config, labels[i])))
  mask = masks_lib.mask_from_labels(config, chosen)
  return MaskResult.make("random", mask, config, seed=seed, budget=int(budget))


def random_mlps(config: masks_lib.Layout, num_units: int, seed: int) -> MaskResult:
  """`num_units` MLP units drawn without replacement."""
  num_layers = masks_lib.layout_config(config).num_layers
  if not 0 < num_units <= num_layers:
    raise ValueError(f"num_units must be in 1..{num_layers}, got {num_units}")
  layers = sorted(
      int(i) for i in np.random.default_rng(seed).choice(num_layers, num_units, replace=False)
  )
  units = [masks_lib.Unit(i, "mlp") for i in layers]
  return MaskResult.make(
      "random_mlps", masks_lib.mask_from_units(config, units), config, seed=seed, layers=layers
  )


def all_mlps(config: masks_lib.Layout) -> MaskResult:
  return MaskResult.make(
      "all_mlps", masks_lib.mask_from_units(config, masks_lib.all_units(config, ("mlp",))), config
  )


def nonlocalized(config: masks_lib.Layout) -> MaskResult:
  return MaskResult.make(
      "nonlocalized", masks_lib.mask_from_units(config, masks_lib.all_units(config)), config
  )


def output_tracing_mlps(
    name: str, scores: Mapping[Any, Any], config: masks_lib.Layout, budget: int
) -> MaskResult:
  """MLP units only, ranked by |signed unit score|, up to `budget` (e.g. "ap_mlps")."""
  sel = masks_lib.scores_to_units(scores, config, budget, mode="reference", kinds=("mlp",))
  return MaskResult.make(name, sel.mask, config, budget=int(budget), selection=sel.to_json())


def output_tracing(
    name: str,
    scores: Mapping[Any, Any],
    config: masks_lib.Layout,
    budget: int,
    mode: str = "reference",
) -> MaskResult:
  """Attention and MLP units (or matrices) from AP/CT scores at `budget`."""
  sel = masks_lib.scores_to_units(scores, config, budget, mode=mode)
  return MaskResult.make(name, sel.mask, config, budget=int(budget), selection=sel.to_json())


def build_baselines(
    config: masks_lib.Layout,
    flu_layers: Sequence[int],
    seed: int,
    scores: Mapping[str, Mapping[Any, Any]] | None = None,
) -> dict[str, MaskResult]:
  """FLU, its budget-matched baselines, and AP/CT masks for whichever scores are given.

  Args:
    config: the model.
    flu_layers: fact-lookup MLP layers (they set the budget).
    seed: seeds the random baselines.
    scores: optional {"ap": component scores, "ct": component scores}; each gives
      "{name}" (attention + MLP units, reference mode) and "{name}_mlps".
  """
  flu = flu_mlps(config, flu_layers)
  budget = flu.trained_parameters
  out = {
      "flu": flu,
      "random": random_matrices(config, budget, seed),
      "random_mlps": random_mlps(config, len(flu.details["layers"]), seed),
      "all_mlps": all_mlps(config),
      "nonlocalized": nonlocalized(config),
  }
  for name, method_scores in (scores or {}).items():
    out[name] = output_tracing(name, method_scores, config, budget)
    out[f"{name}_mlps"] = output_tracing_mlps(f"{name}_mlps", method_scores, config, budget)
  return out
