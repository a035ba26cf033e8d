"""The paper's claims, tested with paired differences over seeds.

Each claim compares fact lookup with other localizations on the measures the paper
names (other formats, relearning, latent probes, soft prompts, side effects); a
comparator that trained fact lookup's own mask in every paired seed is left out. Also
the controls: the same claims at matched edit hyperparameters, the same mask trained
with other hyperparameters, and fact lookup against the non-localized baselines (on
whole-sport settings, whose claim compares no methods, against every method).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mech_unlearn_jax.data.tasks import get_task
from mech_unlearn_jax.study.config import StudySetting, UNEDITED
from mech_unlearn_jax.study.metrics import MASK_JACCARD, SOFT_PROMPT_METRICS
from mech_unlearn_jax.study.aggregate import (
    Interval,
    SIDE_EFFECT_FORMATS,
    StudyData,
    _forget_formats,
    _formats,
    _relearn_steps,
    excludes_zero,
    paired_interval,
    signed_interval,
    t_interval,
)


OUTPUT_TRACING = ("ap", "ct", "ap_mlps", "ct_mlps")


@dataclasses.dataclass(frozen=True)
class Comparison:
  """fact_lookup minus `other` on `metric`, paired by seed.

  `same_mask_seeds`: the paired seeds in which `other` trained exactly the fact-lookup
  mask. Where that is every paired seed, the two cells differ only in their families'
  tuned edit hyperparameters, so the comparison says nothing about localization and
  is left out of the verdict ("same mask").
  """

  metric: str
  other: str
  interval: Interval
  lower_is_better: bool
  seeds: tuple[int, ...] = ()
  same_mask_seeds: tuple[int, ...] = ()

  @property
  def outcome(self) -> str:
    iv = self.interval
    if self.seeds and set(self.same_mask_seeds) == set(self.seeds):
      return "same mask"
    if iv.lo is None:
      return "untestable"
    better = iv.hi < 0 if self.lower_is_better else iv.lo > 0
    worse = iv.lo > 0 if self.lower_is_better else iv.hi < 0
    return "better" if better else "worse" if worse else "unresolved"

  def text(self) -> str:
    seeds = f", seeds {', '.join(map(str, self.seeds))}" if self.seeds else ""
    outcome = self.outcome
    if outcome == "same mask":
      outcome = "same mask as fact_lookup in every seed: compares edit hyperparameters only"
    elif self.same_mask_seeds:
      outcome += f"; same mask as fact_lookup in seed(s) {', '.join(map(str, self.same_mask_seeds))}"
    return f"{self.metric} vs {self.other}: {signed_interval(self.interval)}{seeds} ({outcome})"


def _edit_without_seed(summary: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in summary["spec"]["edit"].items() if k != "seed"}


def fact_lookup_values(
  data: StudyData, setting: str, metric: str, other: str, matched: bool = False
) -> dict[int, float]:
  """Seed -> fact lookup's value of `metric`, to pair with `other`'s cells.

  matched=False: the fact-lookup cells (fact lookup's family's tuned edit). matched=True:
  fact lookup's mask trained with `other`'s edit hyperparameters, where the study has
  such a cell: in each seed, a cell that trained exactly the fact-lookup mask with the
  same edit config as `other`'s cell of that seed (a same-mask comparator of that
  family, or the fact-lookup cell itself when the families agree); seeds without one
  are left out.
  """
  if not matched:
    return dict(data.values.get((setting, "fact_lookup", metric), {}))
  cells = {(s["method"], s["seed"]): s for s in data.summaries if s["setting"] == setting}
  candidates = ("fact_lookup",) + tuple(m for m in data.config.methods if m != "fact_lookup")
  same = {m: set(same_mask_seeds(data, setting, m)) for m in candidates}
  out = {}
  for (method, seed), summary in cells.items():
    if method != other:
      continue
    for m in candidates:
      cell = cells.get((m, seed))
      if (
        cell is not None
        and (m == "fact_lookup" or seed in same[m])
        and metric in cell["metrics"]
        and _edit_without_seed(cell) == _edit_without_seed(summary)
      ):
        out[seed] = cell["metrics"][metric]
        break
  return out


def same_mask_seeds(data: StudyData, setting: str, method: str) -> list[int]:
  """Seeds in which `method`'s cell trained exactly the fact-lookup mask (cells
  without a mask record count as different)."""
  return sorted(seed for seed, j in data.values.get((setting, method, MASK_JACCARD), {}).items() if j == 1.0)


def _verdict(comparisons: Sequence[Comparison]) -> str:
  outcomes = [c.outcome for c in comparisons]
  testable = [o for o in outcomes if o not in ("untestable", "same mask")]
  if not testable:
    if outcomes and all(o == "same mask" for o in outcomes):
      return "cannot be tested: every comparator trained the fact-lookup mask itself"
    return "cannot be tested yet (needs at least 2 paired seeds of fact_lookup and a comparator with another mask)"
  same = outcomes.count("same mask")
  left_out = f"; {same} left out: same mask as fact_lookup in every seed" if same else ""
  if "worse" in testable:
    return f"does not hold ({testable.count('worse')} of {len(testable)} comparisons significantly worse{left_out})"
  if all(o == "better" for o in testable):
    return f"holds (all {len(testable)} comparisons significantly better{left_out})"
  return (
    f"not resolved ({testable.count('better')} of {len(testable)} comparisons significantly better,"
    f" the rest within the interval{left_out})"
  )


# The study's minimum number of seeds. A comparison on fewer can still move a lot: at
# n = 2 the t-interval has one degree of freedom, and two nearly equal differences
# give a narrow interval that a third seed can widen past zero.
MIN_PAIRED_SEEDS = 3


def _provisional(comparisons: Sequence[Comparison], comparators: Sequence[str]) -> str:
  """A note for a verdict that more cells could still change: the output-tracing methods
  of the study with fewer than MIN_PAIRED_SEEDS paired seeds. None where nothing is
  testable ("cannot be tested"), nor for a "does not hold" decided by a comparison on at
  least that many seeds (more comparators cannot undo one significantly worse one)."""
  if all(c.outcome in ("untestable", "same mask") for c in comparisons):
    return ""
  if any(c.outcome == "worse" and len(c.seeds) >= MIN_PAIRED_SEEDS for c in comparisons):
    return ""
  seeds = {m: max((len(c.seeds) for c in comparisons if c.other == m), default=0) for m in comparators}
  thin = [f"{m} ({n})" for m, n in seeds.items() if n < MIN_PAIRED_SEEDS]
  return f"; provisional: fewer than {MIN_PAIRED_SEEDS} paired seeds for {', '.join(thin)}" if thin else ""


def _claim_specs(data: StudyData, setting: str) -> list[tuple[str, list[tuple[str, bool]], list[str]]]:
  """A fact-set setting's claims: (claim, [(metric, lower is better)], formats left out
  because the unedited model answers them at chance)."""
  is_valid = lambda f: data.valid_in_every_seed(setting, f)
  formats = [f for f in _forget_formats(data, setting) if f != "standard"]
  valid = [f for f in formats if is_valid(f)]
  neighbors = [f for f in _formats(data, setting) if f in SIDE_EFFECT_FORMATS]
  return [
    (
      "fact-lookup edits generalize to other prompt formats (lower forget p(true))",
      [(f"forget_{f}", True) for f in valid],
      [f for f in formats if f not in valid],
    ),
    (
      "fact-lookup edits resist relearning (lower held-out forget p(true) after the attack)",
      [
        (f"relearn_{k}_forget_step{_relearn_steps(data, setting, k)[-1]}", True)
        for k in ("lora", "full")
        if _relearn_steps(data, setting, k)
      ],
      [],
    ),
    (
      "fact-lookup edits remove latent knowledge (lower probe accuracy vs the true answer)",
      [("probe_true_mean", True)],
      [],
    ),
    (
      "fact-lookup edits have fewer side effects (maintain, retain KL, trivia, neighbors)",
      [("maintain_standard", False), ("retain_kl", True), ("trivia_accuracy", False)]
      + [(f"forget_{f}", False) for f in neighbors if is_valid(f)],
      [f for f in neighbors if not is_valid(f)],
    ),
  ]


def claims(data: StudyData, matched: bool = False) -> list[dict[str, Any]]:
  """The paper's claims per setting: {setting, claim, verdict, details}.

  `matched`: fact lookup's side is its mask trained with each comparator's own edit
  hyperparameters (`fact_lookup_values`), a control for the per-family tuning; the
  default is the paper's protocol (each method with its family's tuned values).

  Fact-set settings (not whole-sport): fact lookup vs each output-tracing method
  (ap, ct, ap_mlps, ct_mlps), difference paired by seed with a t-interval; a claim
  holds when every testable comparison is significantly in the claimed direction
  and fails when one is significantly in the other; a verdict other than "does not
  hold" is marked provisional while a comparator has fewer than MIN_PAIRED_SEEDS paired
  seeds, and so is a "does not hold" that only such comparators decide (`_provisional`).
  Only formats the unedited model answers above chance in every seed count, and only
  comparators whose mask differs from fact lookup's in at least one paired seed
  (`Comparison`). Whole-sport settings: every method's LoRA relearning recovers at least
  half of what the edit removed on the held-out half (recovery = (p_last - p_0) / (p_unedited - p_0), a t-interval over seeds).
  """
  out = []
  for setting in data.config.settings:
    task = get_task(setting.task)
    present = set(data.metrics(setting.name))
    if task.whole_set_split(setting.split):
      if not matched:  # whole-sport claims do not compare with fact lookup
        out.append(_whole_set_claim(data, setting, present))
      continue
    others = [m for m in OUTPUT_TRACING if m in data.config.methods]
    same_by_other = {m: set(same_mask_seeds(data, setting.name, m)) for m in others}
    specs = _claim_specs(data, setting.name)
    if not any(k[0] == setting.name for k in data.values):
      out.append(
        {
          "setting": setting.name,
          "claim": "all claims",
          "verdict": "cannot be tested yet (no finished cells)",
          "details": [],
        }
      )
      continue
    for claim, metrics, skipped in specs:
      comps = []
      for metric, lower in metrics:
        if metric not in present:
          continue
        for other in others:
          paired = paired_interval(
            fact_lookup_values(data, setting.name, metric, other, matched),
            data.values.get((setting.name, other, metric), {}),
            data.config.confidence,
          )
          if paired is not None:
            seeds, iv = paired
            same = tuple(s for s in seeds if s in same_by_other[other])
            comps.append(Comparison(metric, other, iv, lower, seeds, same))
      if comps:
        verdict = _verdict(comps) + _provisional(comps, others)
      elif skipped and not metrics:
        verdict = "cannot be tested with this model: the unedited model is at chance in every other format"
      else:
        verdict = "cannot be tested yet (no finished fact_lookup and output-tracing cells with these metrics)"
      details = [c.text() for c in comps]
      if skipped:
        details.append(f"not counted (unedited model at chance): {skipped}")
      out.append({"setting": setting.name, "claim": claim, "verdict": verdict, "details": details})
  for item in out:
    item["protocol"] = "matched edit hyperparameters" if matched else "per-family tuned edit hyperparameters"
  return out


def _contrast_metrics(data: StudyData, setting: str) -> list[str]:
  """The claims' metrics of a setting, with the soft-prompt attacks after relearning
  (an attack no claim counts, reported beside them)."""
  out = []
  for _, metrics, _ in _claim_specs(data, setting):
    out.extend(metric for metric, _ in metrics)
    if any(metric.startswith("relearn_") for metric, _ in metrics):
      out.extend(SOFT_PROMPT_METRICS)
  return out


def baseline_contrasts(data: StudyData, setting: StudySetting) -> dict[str, Any] | None:
  """Fact lookup minus other methods, paired by seed, on the claims' metrics and the
  soft-prompt attacks, reported beside the verdicts.

  Fact-set settings: every baseline (every method but fact lookup and output tracing,
  which the verdicts test): the paper's comparisons with random, all-MLP and
  nonlocalized edits. Whole-sport settings, whose one claim (relearning) does not
  compare methods: every other method, output tracing included, as a description.

  Returns None without a method paired with fact lookup; else {"setting", "methods",
  "rows": [(metric, {method: Interval})], "whole_set", "confidence", "same_mask":
  {method: seeds in which it trained fact lookup's mask}}.
  """
  whole_set = get_task(setting.task).whole_set_split(setting.split)
  methods = [
    m for m in data.config.methods if m != "fact_lookup" and (whole_set or m not in OUTPUT_TRACING)
  ]
  rows, used = [], []
  for metric in _contrast_metrics(data, setting.name):
    mine = data.values.get((setting.name, "fact_lookup", metric), {})
    row = {}
    for m in methods:
      paired = paired_interval(mine, data.values.get((setting.name, m, metric), {}), data.config.confidence)
      if paired is not None:
        row[m] = paired[1]
        used.append(m)
    if row:
      rows.append((metric, row))
  if not rows:
    return None
  methods = [m for m in methods if m in used]
  same = {m: same_mask_seeds(data, setting.name, m) for m in methods}
  return {
    "setting": setting.name, "methods": methods, "rows": rows, "whole_set": whole_set,
    "confidence": data.config.confidence,
    "same_mask": {m: seeds for m, seeds in same.items() if seeds},
  }


def baseline_markdown(contrast: Mapping[str, Any]) -> str:
  """`baseline_contrasts` as a table (mean [t-interval], n seeds)."""
  methods = contrast["methods"]
  intervals = [iv for _, row in contrast["rows"] for iv in row.values() if iv.lo is not None]
  confidence = contrast["confidence"]
  if contrast["whole_set"]:
    title = f"### Fact lookup against every method: {contrast['setting']}\n"
    why = (
      "A description: the whole-sport claim (relearning) does not compare methods, so no verdict"
      " reads this table."
    )
  else:
    title = f"### Fact lookup against the baselines: {contrast['setting']}\n"
    why = "Not part of the verdicts above, which compare with output tracing."
  if intervals:
    count = (
      f" {sum(map(excludes_zero, intervals))} of these {len(intervals)} intervals exclude 0; at {confidence:.0%},"
      f" about {(1 - confidence) * len(intervals):.1f} would by chance alone if no method differed (fewer"
      " independent ones: the metrics move together)."
    )
  else:
    count = " One paired seed each so far: no intervals."
  lines = [
    title,
    "Fact lookup minus each method, paired by seed: mean [t-interval] (n seeds); `*` where the interval"
    f" excludes 0. {why}{count}\n",
  ]
  same = contrast["same_mask"]
  if same:
    lines.append(
      "Same mask as fact lookup (the difference is 0 in those seeds): "
      + "; ".join(f"{m} in seed(s) {', '.join(map(str, seeds))}" for m, seeds in same.items())
      + ".\n"
    )
  lines += [
    "| metric | " + " | ".join(methods) + " |",
    "|---|" + "---|" * len(methods),
  ]
  for metric, row in contrast["rows"]:
    cells = []
    for m in methods:
      iv = row.get(m)
      if iv is None:
        cells.append("-")
      elif iv.lo is None:
        cells.append(f"{iv.mean:+.3f} (1)")
      else:
        star = "*" if excludes_zero(iv) else ""
        cells.append(f"{iv.mean:+.3f}{star} [{iv.lo:+.3f}, {iv.hi:+.3f}] ({iv.n})")
    lines.append(f"| {metric} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def same_mask_contrasts(data: StudyData, setting: StudySetting) -> dict[str, Any] | None:
  """Fact lookup against cells that trained exactly its mask: what the families' tuned
  edit hyperparameters alone change.

  In each seed, the cells of other methods whose mask equals that seed's fact-lookup
  mask (`MASK_JACCARD` 1) and whose edit config differs from fact lookup's differ from
  the fact-lookup cell only in their family's edit hyperparameters (same data, same order, same trained weights). Their mean is paired
  with the fact-lookup cell, and the differences get a t-interval over seeds, for the
  metrics of the claims. Returns None for whole-sport settings or when no seed has
  such a cell; else {"setting", "comparators" (seed -> methods), "hyperparameters"
  (key -> [fact lookup's value, the comparators' values]), "rows" [(metric, Interval)]}.
  """
  if get_task(setting.task).whole_set_split(setting.split):
    return None
  cells = {(s["method"], s["seed"]): s for s in data.summaries if s["setting"] == setting.name}
  same = {m: set(same_mask_seeds(data, setting.name, m)) for m in data.config.methods}
  # A same-mask cell with fact lookup's own edit config (its tuning family, or a copy)
  # is fact lookup's cell again: a difference of exactly 0 that says nothing.
  comparators = {
    seed: [
      m
      for m in data.config.methods
      if m != "fact_lookup" and seed in same[m]
      and _edit_without_seed(cells[(m, seed)]) != _edit_without_seed(cells[("fact_lookup", seed)])
    ]
    for seed in sorted(seed for (m, seed) in cells if m == "fact_lookup")
  }
  comparators = {seed: ms for seed, ms in comparators.items() if ms}
  if not comparators:
    return None
  hyper: dict[str, list[Any]] = {}
  for seed, methods in comparators.items():
    mine = _edit_without_seed(cells[("fact_lookup", seed)])
    for m in methods:
      for key, value in _edit_without_seed(cells[(m, seed)]).items():
        if mine.get(key) != value:
          values = hyper.setdefault(key, [mine.get(key)])
          if value not in values[1:]:
            values.append(value)
  present = set(data.metrics(setting.name))
  rows = []
  for _, metrics, _ in _claim_specs(data, setting.name):
    for metric, _ in metrics:
      mine = data.values.get((setting.name, "fact_lookup", metric), {})
      diffs = [
        mine[seed] - float(np.mean([data.values[(setting.name, m, metric)][seed] for m in methods]))
        for seed, methods in comparators.items()
        if seed in mine and all(seed in data.values.get((setting.name, m, metric), {}) for m in methods)
      ]
      if metric in present and diffs:
        rows.append((metric, t_interval(diffs, data.config.confidence)))
  return {"setting": setting.name, "comparators": comparators, "hyperparameters": hyper, "rows": rows}


def same_mask_markdown(contrast: Mapping[str, Any]) -> str:
  """`same_mask_contrasts` as a paragraph and a table."""
  pairs = "; ".join(f"seed {seed}: {', '.join(ms)}" for seed, ms in contrast["comparators"].items())
  hyper = ", ".join(
    f"`{k}` {v[0]} (fact lookup) vs {' / '.join(map(str, v[1:]))}" for k, v in contrast["hyperparameters"].items()
  ) or "none (identical edits)"
  lines = [
    f"### Same mask, other edit hyperparameters: {contrast['setting']}\n",
    f"Cells that trained exactly the fact-lookup mask ({pairs}). They differ from fact lookup's cell"
    f" of the same seed only in their family's tuned edit hyperparameters: {hyper}. Fact lookup minus"
    " them, mean [t-interval over seeds]: a difference here is the hyperparameters' doing, not the"
    " localization's.\n",
    "| metric | fact lookup - same-mask cells | seeds |",
    "|---|---|---|",
  ]
  for metric, iv in contrast["rows"]:
    lines.append(f"| {metric} | {signed_interval(iv)} | {iv.n} |")
  return "\n".join(lines) + "\n"


def _whole_set_claim(data: StudyData, setting: StudySetting, present: set[str]) -> dict[str, Any]:
  claim = "whole-sport edits are relearned by every method (LoRA recovers >= half of the edit's drop)"
  steps = _relearn_steps(data, setting.name, "lora")
  if not steps:
    return {
      "setting": setting.name,
      "claim": claim,
      "verdict": "cannot be tested yet (no relearning results)",
      "details": [],
    }
  last = f"relearn_lora_forget_step{steps[-1]}"
  first = f"relearn_lora_forget_step{steps[0]}"
  base = data.values.get((setting.name, UNEDITED, first), {})
  details, outcomes, nothing = [], [], 0
  for m in data.config.methods:
    p0, p1 = data.values.get((setting.name, m, first), {}), data.values.get((setting.name, m, last), {})
    ratios = [
      (p1[s] - p0[s]) / (base[s] - p0[s]) for s in sorted(set(p0) & set(p1) & set(base)) if base[s] - p0[s] > 0.05
    ]
    if not ratios:
      if p0:
        nothing += 1
        details.append(f"{m}: the edit lowered held-out p(true) by <= 0.05: nothing to relearn")
      continue
    iv = t_interval(ratios, data.config.confidence)
    outcome = (
      "untestable"
      if iv.lo is None
      else "relearned"
      if iv.lo > 0.5
      else "not relearned"
      if iv.hi < 0.5
      else "unresolved"
    )
    outcomes.append(outcome)
    bounds = "" if iv.lo is None else f" [{iv.lo:.2f}, {iv.hi:.2f}]"
    details.append(f"{m}: recovery {iv.mean:.2f}{bounds} ({outcome})")
  testable = [o for o in outcomes if o != "untestable"]
  # Methods not counted: no finished seeds yet, one seed only, or nothing to relearn.
  n = len(data.config.methods)
  counted = f"{len(testable)} of {n} methods testable" + (f", {nothing} with nothing to relearn" if nothing else "")
  if not testable:
    verdict = "cannot be tested yet (needs at least 2 seeds per method)"
  elif "not relearned" in testable:
    verdict = f"does not hold ({testable.count('not relearned')} method(s) significantly below half recovery; {counted})"
  elif all(o == "relearned" for o in testable):
    verdict = f"holds for the methods tested (each recovers significantly more than half; {counted})"
  else:
    verdict = f"not resolved ({testable.count('relearned')} significantly relearned; {counted})"
  return {"setting": setting.name, "claim": claim, "verdict": verdict, "details": details}


def verdict_rule(confidence: float) -> str:
  """How `claims` reads its comparisons, in one paragraph for the reports."""
  return (
    f"Fact-set settings: fact lookup minus each output-tracing method ({', '.join(OUTPUT_TRACING)}),"
    f" paired by seed, with a {confidence:.0%} t-interval. A claim holds when every comparison is"
    " significantly in the claimed direction, does not hold when one is significantly in the other, and"
    " is not resolved otherwise; only formats the unedited model answers above chance in every seed"
    " count, a comparator that trained fact lookup's own mask in every paired seed is left out, and a"
    f" verdict is provisional while a comparator has fewer than {MIN_PAIRED_SEEDS} paired seeds (a"
    ' "does not hold" only where no comparison on that many seeds decides it). Whole-sport settings:'
    " every method's LoRA relearning recovers at least half of what the edit"
    " removed on the held-out half (a t-interval over seeds).\n"
  )


def claims_markdown(items: Sequence[Mapping[str, Any]]) -> str:
  """The claims as a verdict table followed by each claim's comparisons."""
  lines = ["| setting | claim | verdict |", "|---|---|---|"]
  for c in items:
    lines.append(f"| {c['setting']} | {c['claim']} | {c['verdict']} |")
  lines.append("")
  for c in items:
    if c["details"]:
      lines.append(f"- {c['setting']}, {c['claim']}:")
      lines.extend(f"  - {d}" for d in c["details"])
  return "\n".join(lines) + "\n"
