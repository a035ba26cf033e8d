"""Learning-rate and forget-coefficient sweeps scored on standard-format metrics only.

METHOD §3: the reference tuned the learning rate, then c_f, per localization method,
scoring retain-text accuracy + (1 - forget accuracy) + maintain accuracy + edit
accuracy in the *standard* prompt format. Robustness metrics (other formats, attacks)
are never used for tuning, so they stay an honest test of the chosen setting.

A setting whose edit diverged (the trainer's `NonFiniteError`) or whose score is not
a finite number is recorded with its reason and score -inf, and is never the best: a
NaN compares false with everything, so `max` could otherwise return it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from mech_unlearn_jax import experiment, io
from mech_unlearn_jax import train as train_lib


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def standard_format_score(results: Mapping[str, Any]) -> dict[str, Any]:
  """retain acc + (1 - forget p(true)) + maintain p(true) + edit p(target), standard format.

  A missing or non-finite part (NaN in memory, null once written as JSON) makes the
  score -inf with `non_finite` naming the parts.
  """
  rows = {(r["format"], r["facts"], r["answer"]): r for r in results["summary"]}

  def prob(facts, answer):
    row = rows.get(("standard", facts, answer))
    return None if row is None else row["edited_prob"]

  forget, maintain, edit = prob("forget", "correct"), prob("maintain", "correct"), prob("forget", "edit")
  retain = results["edited"]["retain_text"]["accuracy"]
  parts = {"retain_accuracy": retain, "forget": forget, "maintain": maintain, "edit": edit}
  # Pure unlearning has no edit target: that part is absent, not broken.
  required = {k: v for k, v in parts.items() if k != "edit" or v is not None}
  bad = sorted(k for k, v in required.items() if not _finite(v))
  if bad:
    return {**{k: v for k, v in required.items() if _finite(v)}, "score": -math.inf, "non_finite": bad}
  total = retain + (1 - forget) + maintain + (edit if edit is not None else 0.0)
  return {**required, "score": total}


def best_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
  """The row with the highest finite score, or None when no row has one."""
  finite = [r for r in rows if _finite(r.get("score"))]
  return max(finite, key=lambda r: r["score"]) if finite else None


def run_sweep(
    base: experiment.ExperimentSpec,
    workdir: str | pathlib.Path,
    learning_rates: Sequence[float],
    forget_coefs: Sequence[float],
) -> list[dict[str, Any]]:
  """Runs every (lr, c_f) combination in its own sub-workdir (each resumable).

  Writes sweep.json ({"rows", "best"}) after every setting. A diverged setting is a
  row with `error` and score -inf; the sweep goes on.

  Raises:
    ValueError: no setting produced a finite score (after writing sweep.json).
  """
  workdir = pathlib.Path(workdir)
  rows = []
  for lr, cf in itertools.product(learning_rates, forget_coefs):
    spec = dataclasses.replace(base, edit=dataclasses.replace(base.edit, lr=float(lr), forget_coef=float(cf)))
    sub = workdir / f"lr{lr:g}_cf{cf:g}"
    try:
      results = experiment.run_experiment(spec, sub)
    except train_lib.NonFiniteError as e:
      rows.append({"lr": lr, "forget_coef": cf, "score": -math.inf, "error": str(e)})
    else:
      rows.append({"lr": lr, "forget_coef": cf, **standard_format_score(results)})
    io.write_json(workdir / "sweep.json", {"rows": rows})
  best = best_row(rows)
  io.write_json(workdir / "sweep.json", {"rows": rows, "best": best})
  if best is None:
    raise ValueError(
        f"{workdir / 'sweep.json'}: no setting of the sweep has a finite score (every edit diverged"
        " or scored NaN); try smaller learning rates"
    )
  return rows
