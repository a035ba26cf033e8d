"""Learning-rate and forget-coefficient sweeps scored on standard-format metrics only.

METHOD §3: the reference tuned the learning rate, then c_f, per localization method,
scoring retain-text accuracy + (1 - forget accuracy) + maintain accuracy + edit
accuracy in the *standard* prompt format. Robustness metrics (other formats, attacks)
are never used for tuning, so they stay an honest test of the chosen setting.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from mech_unlearn_jax import experiment, io


def standard_format_score(results: Mapping[str, Any]) -> dict[str, float]:
  """retain acc + (1 - forget p(true)) + maintain p(true) + edit p(target), standard format."""
  rows = {(r["format"], r["facts"], r["answer"]): r for r in results["summary"]}

  def prob(facts, answer):
    row = rows.get(("standard", facts, answer))
    return None if row is None else row["edited_prob"]

  forget, maintain, edit = prob("forget", "correct"), prob("maintain", "correct"), prob("forget", "edit")
  retain = results["edited"]["retain_text"]["accuracy"]
  parts = {"retain_accuracy": retain, "forget": forget, "maintain": maintain, "edit": edit}
  total = retain + (1 - forget) + maintain + (edit if edit is not None else 0.0)
  return {**{k: v for k, v in parts.items() if v is not None}, "score": total}


def run_sweep(
    base: experiment.ExperimentSpec,
    workdir: str | pathlib.Path,
    learning_rates: Sequence[float],
    forget_coefs: Sequence[float],
) -> list[dict[str, Any]]:
  """Runs every (lr, c_f) combination in its own sub-workdir (each resumable)."""
  workdir = pathlib.Path(workdir)
  rows = []
  for lr, cf in itertools.product(learning_rates, forget_coefs):
    spec = dataclasses.replace(base, edit=dataclasses.replace(base.edit, lr=float(lr), forget_coef=float(cf)))
    results = experiment.run_experiment(spec, workdir / f"lr{lr:g}_cf{cf:g}")
    rows.append({"lr": lr, "forget_coef": cf, **standard_format_score(results)})
    io.write_json(workdir / "sweep.json", {"rows": rows})
  best = max(rows, key=lambda r: r["score"])
  io.write_json(workdir / "sweep.json", {"rows": rows, "best": best})
  return rows
