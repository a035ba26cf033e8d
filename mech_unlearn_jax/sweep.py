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
  return {**required, "score": total, **_reading_only(results)}


def _reading_only(results: Mapping[str, Any]) -> dict[str, float]:
  # The held-out retain KL says what a setting costs the rest of the model; it is
  # shown next to the score and never enters it (the score is the paper's).
  kl = results["edited"].get("kl_original_edited")
  return {"retain_kl": kl} if _finite(kl) else {}


def best_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
  """The row with the highest finite score, or None when no row has one."""
  finite = [r for r in rows if _finite(r.get("score"))]
  return max(finite, key=lambda r: r["score"]) if finite else None


def sweep_markdown(record: Mapping[str, Any], title: str) -> str:
  """sweep.json as a table: one row per setting, in the order run, best marked."""
  best = record.get("best") or {}
  lines = [
      f"### {title}", "",
      "| lr | c_f | retain acc | forget p(true) | maintain p(true) | edit p(target) | score | KL | |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  fmt = lambda v: f"{v:.3f}" if _finite(v) else "-"
  for r in record["rows"]:
    mark = "best" if (r["lr"], r["forget_coef"]) == (best.get("lr"), best.get("forget_coef")) else r.get("error", "")
    lines.append(
        f"| {r['lr']:g} | {r['forget_coef']:g} | {fmt(r.get('retain_accuracy'))} | {fmt(r.get('forget'))} |"
        f" {fmt(r.get('maintain'))} | {fmt(r.get('edit'))} | {fmt(r['score'])} | {fmt(r.get('retain_kl'))} | {mark} |"
    )
  how = "lr at the first c_f, then c_f at the best lr" if record.get("staged") else "every (lr, c_f) pair"
  lines += [
      "",
      f"Score = retain acc + (1 - forget) + maintain + edit, standard format only; {how}. KL"
      " (original || edited) on the held-out retain windows, nats per token, is for reading: the"
      " score does not use it.",
  ]
  if not record.get("finished", True):
    lines += [
        "",
        f"**Incomplete**: {len(record['rows'])} of the planned settings ran (the sweep is still running"
        " or was stopped; the same command resumes it). \"best\" is the best so far.",
    ]
  return "\n".join(lines) + "\n"


def sweep_spec(base: experiment.ExperimentSpec) -> experiment.ExperimentSpec:
  """What a sweep setting runs: `base` scored in the standard format only, no attacks.

  Other formats and the robustness suite are not part of the score (METHOD §3), so
  computing them for every setting would cost time and tempt nobody honestly.
  """
  return dataclasses.replace(
      base,
      eval=dataclasses.replace(base.eval, formats=("standard",)),
      robustness=dataclasses.replace(
          base.robustness, relearn=False, probes=False, soft_prompt=False, trivia=False, mc_benchmark=""
      ),
  )


def _setting_dir(workdir: pathlib.Path, lr: float, cf: float) -> pathlib.Path:
  return workdir / f"lr{lr:g}_cf{cf:g}"


def run_sweep(
    base: experiment.ExperimentSpec,
    workdir: str | pathlib.Path,
    learning_rates: Sequence[float],
    forget_coefs: Sequence[float],
    staged: bool = True,
    loaded: tuple[Any, Any] | None = None,
) -> list[dict[str, Any]]:
  """Sweeps lr and c_f, each setting a main job in its own sub-workdir (resumable).

  staged (METHOD §3, as the reference tuned): every learning rate at c_f =
  forget_coefs[0], then every c_f at the best learning rate; otherwise the full
  product. Settings run `sweep_spec(base)` and share the knowledge filter, the
  fact-lookup evidence and the unedited model's evaluation (`workdir/shared`), which
  do not depend on lr or c_f; `loaded` = (model, tokenizer) is loaded once if None.
  Writes sweep.json ({"rows", "best", "staged", "finished"}) and its table sweep.md
  after every setting, so a stopped sweep leaves its finished rows readable. A
  diverged setting is a row with `error` and score -inf; the sweep goes on.

  Raises:
    ValueError: no setting produced a finite score (after writing sweep.json).
  """
  workdir = pathlib.Path(workdir)
  spec = sweep_spec(base)
  shared = experiment.SharedOutputs(
      knowledge=workdir / "shared" / "knowledge.json",
      evidence_dir=workdir / "shared" / "evidence",
      unedited_dir=workdir / "shared" / "unedited",
  )
  rows: list[dict[str, Any]] = []
  title = f"{base.localize.method}, {base.data.task} {base.data.split}"

  def write(finished: bool) -> dict[str, Any]:
    record = {"rows": rows, "staged": staged, "best": best_row(rows), "finished": finished}
    io.write_json(workdir / "sweep.json", record)
    io.write_text(workdir / "sweep.md", sweep_markdown(record, title))
    return record

  def run(lr: float, cf: float) -> None:
    if any(r["lr"] == lr and r["forget_coef"] == cf for r in rows):
      return
    setting = dataclasses.replace(spec, edit=dataclasses.replace(spec.edit, lr=float(lr), forget_coef=float(cf)))
    try:
      results = experiment.run_experiment(setting, _setting_dir(workdir, lr, cf), shared=shared, loaded=loaded)
    except train_lib.NonFiniteError as e:
      rows.append({"lr": lr, "forget_coef": cf, "score": -math.inf, "error": str(e)})
    else:
      rows.append({"lr": lr, "forget_coef": cf, **standard_format_score(results)})
    write(finished=False)

  if loaded is None:
    from mech_unlearn_jax.models import loaders  # pylint: disable=g-import-not-at-top

    loaded = loaders.load_model_and_tokenizer(spec.model, spec.seed)
  if staged:
    for lr in learning_rates:
      run(lr, forget_coefs[0])
    best_lr = best_row(rows)
    if best_lr is not None:
      for cf in forget_coefs:
        run(best_lr["lr"], cf)
  else:
    for lr, cf in itertools.product(learning_rates, forget_coefs):
      run(lr, cf)
  if write(finished=True)["best"] is None:
    raise ValueError(
        f"{workdir / 'sweep.json'}: no setting of the sweep has a finite score (every edit diverged"
        " or scored NaN); try smaller learning rates"
    )
  return rows
