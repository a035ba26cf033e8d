"""One cell's metrics: the flat name -> value dict a study row is made of.

Accuracies are probabilities, as in the paper: sports answers normalized over the
candidate sports, letter-MC over the option letters; CounterFact (except letter-MC) the
full-vocabulary probability of the first target token. `<metric>_argmax` is the matching
argmax accuracy (CounterFact: top-1 over the vocabulary).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mech_unlearn_jax.data.tasks import get_task
from mech_unlearn_jax.evals import formats_eval


# The soft-prompt attacks, and the study metric of each: the held-out forget facts'
# p(true) after the attack.
SOFT_PROMPT_KINDS = ("prefix", "adapter")
SOFT_PROMPT_METRICS = tuple(f"softprompt_{kind}_forget" for kind in SOFT_PROMPT_KINDS)


def _measure(task: str, fmt: str) -> tuple[str, str]:
  """(probability field, argmax field) of a format's cells (see the module docstring)."""
  return formats_eval.accuracy_fields(get_task(task).first_token_only, fmt)


def _put(out: dict[str, float], name: str, value: Any) -> None:
  if value is not None and isinstance(value, (int, float)) and math.isfinite(value):
    out[name] = float(value)


def _format_cells(out, cells, task, prefix="", suffix="", facts_names=("forget", "forget_heldout")):
  for c in cells:
    kind = "maintain" if c["facts"] == "maintain" else "forget" if c["facts"] in facts_names else None
    trained_half = c["facts"] == "forget_train"  # a whole-set split's trained half
    if kind is None and not trained_half:
      continue
    role = "edit" if c["answer"] == "edit" else kind or "forget"
    if trained_half:
      role += "_train"
    p_key, a_key = _measure(task, c["format"])
    _put(out, f"{prefix}{role}_{c['format']}{suffix}", c[p_key])
    _put(out, f"{prefix}{role}_{c['format']}{suffix}_argmax", c[a_key])


def robustness_metrics(robust: Mapping[str, Any], task: str) -> dict[str, float]:
  """Relearning, probe, soft-prompt and side-effect metrics of one model's stages."""
  out: dict[str, float] = {}
  for kind in ("lora", "full"):
    res = robust.get(f"relearn_{kind}")
    if not res:
      continue
    for step, ev in sorted(res["curve"].items(), key=lambda kv: int(kv[0])):
      for c in ev["cells"]:
        p_key, a_key = _measure(task, c["format"])
        role = "edit" if c["answer"] == "edit" else "forget"
        fmt = "" if c["format"] == "standard" else f"_{c['format']}"
        _put(out, f"relearn_{kind}_{role}{fmt}_step{int(step)}", c[p_key])
        _put(out, f"relearn_{kind}_{role}{fmt}_step{int(step)}_argmax", c[a_key])
  probes = robust.get("probes")
  if probes:
    for part, prefix in (("retrained", "probe"), ("transfer", "probe_transfer")):
      res = probes.get(part)
      if not res:
        continue
      s = res["summary"]
      for key, name in (("forget_true", "true"), ("forget_edit", "edit"), ("heldout", "heldout")):
        _put(out, f"{prefix}_{name}_mean", s.get(f"{key}_mean"))
        _put(out, f"{prefix}_{name}_max", s.get(f"{key}_max"))
      if part == "retrained":
        for key, name in (("forget_true_accuracy", "true"), ("forget_edit_accuracy", "edit")):
          for layer, v in enumerate(res.get(key) or []):
            _put(out, f"probe_{name}_layer{layer:02d}", v)
    _put(out, "probe_chance", probes.get("chance"))
    _put(out, "probe_prior_true", probes.get("prior_true"))
    _put(out, "probe_prior_edit", probes.get("prior_edit"))
  for kind, name in zip(SOFT_PROMPT_KINDS, SOFT_PROMPT_METRICS):
    res = robust.get(f"softprompt_{kind}")
    if not res:
      continue
    if task == "counterfact":
      # The summary normalizes over (true, false); CounterFact reports full-vocab p.
      _put(out, name, float(np.mean([r["eval"]["prob_full"] for r in res["runs"]])))
      _put(out, f"softprompt_{kind}_before", res["before_eval"]["prob_full"])
    else:
      _put(out, name, res["summary"]["prob_normalized_mean"])
      _put(out, f"{name}_argmax", res["summary"]["argmax_candidates_mean"])
      _put(out, f"softprompt_{kind}_before", res["before_eval"]["prob_normalized"])
  for key in ("trivia", "mc_benchmark"):
    res = robust.get(key)
    if res:
      _put(out, f"{key}_accuracy", res["prob_normalized"])
      _put(out, f"{key}_accuracy_argmax", res["accuracy"])
  return out


def cell_metrics(results: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
  """(edited metrics, unedited-control metrics) of a run's results dict."""
  task = results["config"]["data"]["task"]
  edited: dict[str, float] = {}
  _format_cells(edited, results["edited"]["cells"], task)
  _put(edited, "retain_kl", results["edited"].get("kl_original_edited"))
  _put(edited, "retain_loss", results["edited"]["retain_text"]["loss"])
  _put(edited, "retain_token_accuracy", results["edited"]["retain_text"]["accuracy"])
  _put(edited, "trained_parameters", results["trained_parameters"])
  if results.get("edit_history"):
    _put(edited, "train_final_loss", results["edit_history"][-1].get("loss"))
  edited.update(robustness_metrics(results.get("robustness", {}).get("edited", {}), task))

  unedited: dict[str, float] = {}
  _format_cells(unedited, results["unedited"]["cells"], task)
  unedited["retain_kl"] = 0.0  # KL of the model to itself
  _put(unedited, "retain_loss", results["unedited"]["retain_text"]["loss"])
  _put(unedited, "retain_token_accuracy", results["unedited"]["retain_text"]["accuracy"])
  unedited["trained_parameters"] = 0.0
  unedited.update(robustness_metrics(results.get("robustness", {}).get("unedited", {}), task))
  return edited, unedited


MASK_JACCARD = "mask_jaccard_fact_lookup"
