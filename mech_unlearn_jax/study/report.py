"""What a reader of a study gets: `study.md` (the paper's tables per setting, the
claims, the cells and their cost), `study.csv`, `claims.json` and the figures, all
rebuilt from the finished cells' summaries (`write_outputs`)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mech_unlearn_jax import io
from mech_unlearn_jax.data.tasks import get_task
from mech_unlearn_jax.study.config import StudyConfig, StudySetting, UNEDITED
from mech_unlearn_jax.study.metrics import MASK_JACCARD, SOFT_PROMPT_KINDS, SOFT_PROMPT_METRICS
from mech_unlearn_jax.study.aggregate import SIDE_EFFECT_FORMATS, StudyData, _fmt_interval, clipped_to_range, _forget_formats, _formats, _relearn_steps, collect, csv_text
from mech_unlearn_jax.study.comparisons import baseline_contrasts, baseline_markdown, claims, claims_markdown, same_mask_contrasts, same_mask_markdown, same_mask_seeds, verdict_rule


def table_columns(data: StudyData, setting: str) -> list[tuple[str, list[str]]]:
  """The three tables of a setting (the paper's Tables 1-3): (title, metric columns)."""
  present = set(data.metrics(setting))
  formats = _formats(data, setting)
  # forget_train_* / edit_train_*: a whole-set split's trained half (the rest: held out).
  t1 = ["forget_standard", "edit_standard", "forget_train_standard", "edit_train_standard", "maintain_standard"]
  t1 += [f"{role}_{f}" for f in _forget_formats(data, setting) if f != "standard" for role in ("forget", "edit")]
  lora, full = _relearn_steps(data, setting, "lora"), _relearn_steps(data, setting, "full")
  t2 = [f"relearn_lora_forget_step{s}" for s in lora if s > 0]
  t2 += [f"relearn_full_forget_step{full[-1]}"] if full else []
  t2 += ["probe_true_mean", "probe_edit_mean", *SOFT_PROMPT_METRICS]
  t3 = [f"maintain_{f}" for f in formats if f != "standard"]
  t3 += [f"{role}_{f}" for f in formats if f in SIDE_EFFECT_FORMATS for role in ("forget", "edit")]
  t3 += ["trivia_accuracy", "mc_benchmark_accuracy", "retain_kl", "trained_parameters", MASK_JACCARD, "cell_seconds"]
  tables = [
    ("Table 1: edit and forget accuracy by prompt format", t1),
    ("Table 2: robustness (held-out forget facts after attacks; latent probes)", t2),
    ("Table 3: side effects and cost", t3),
  ]
  return [(title, [c for c in cols if c in present]) for title, cols in tables]


def _column_format(metric: str) -> str | None:
  """The prompt format a forget/edit/maintain metric is measured in."""
  for role in ("forget_", "edit_", "maintain_"):
    if metric.startswith(role):
      return metric[len(role) :].removesuffix("_argmax")
  return None


def _invalid_formats(data: StudyData, setting: str) -> set[str]:
  """Formats the unedited model answers at chance in at least one seed."""
  out = set()
  for f in _formats(data, setting):
    k, n = data.format_valid(setting, f)
    if n and k < n:
      out.add(f)
  return out


def _headline_columns(
    data: StudyData, name: str, methods: Sequence[str], every_attack: bool = False
) -> list[tuple[str, str]]:
  """(metric, title) of the headline and per-seed tables: forget p(true) in every forget
  format the unedited model answers above chance (and a whole-set split's trained half;
  side-effect formats such as CounterFact neighborhood get their own labelled column), the
  LoRA attack's last step (`every_attack`: also full-rank relearning and both soft
  prompts), the probe and its class prior, the retain KL; only metrics some method has."""
  invalid = _invalid_formats(data, name)
  lora, full = _relearn_steps(data, name, "lora"), _relearn_steps(data, name, "full")
  cols = [(f"forget_{f}", f) for f in _forget_formats(data, name) if f not in invalid]
  if "standard" not in invalid:  # a whole-set split: its trained half too (absent otherwise)
    cols.insert(1, ("forget_train_standard", "standard, trained half"))
  if lora:
    cols.append((f"relearn_lora_forget_step{lora[-1]}", f"LoRA relearning, step {lora[-1]}"))
  if every_attack:
    if full:
      cols.append((f"relearn_full_forget_step{full[-1]}", f"full-rank relearning, step {full[-1]}"))
    cols += [(name, f"soft prompt {kind}") for kind, name in zip(SOFT_PROMPT_KINDS, SOFT_PROMPT_METRICS)]
  cols += [("probe_true_mean", "probe vs true answer"), ("probe_prior_true", "probe class prior")]
  # Side-effect formats keep their own, labelled column: there higher is better.
  cols += [(f"forget_{f}", f"{f} p(true), side effect") for f in _formats(data, name) if f in SIDE_EFFECT_FORMATS and f not in invalid]
  cols += [("retain_kl", "retain KL")]
  return [(metric, title) for metric, title in cols if any((name, m, metric) in data.values for m in methods)]


def _value_text(metric: str, value: float | None) -> str:
  return "-" if value is None else f"{value:.{4 if metric == 'retain_kl' else 3}f}"


def headline_markdown(data: StudyData, setting: StudySetting) -> str:
  """One compact table per setting: mean over seeds of the metrics a reader looks at first.

  Per method: seeds finished, seeds whose mask equals fact lookup's (Jaccard 1), forget
  p(true) in every forget format the unedited model answers above chance, the LoRA
  relearning attack's last step, the latent probe against the true answer (and the class
  prior on the same rows, where the cells recorded it), side-effect formats' p(true)
  (CounterFact neighborhood) and the retain KL. The
  README's study table is a copy of it; intervals are in the tables that follow.
  """
  name = setting.name
  methods = [m for m in (UNEDITED,) + data.config.methods if (name, m, "forget_standard") in data.values]
  if not methods:
    return ""
  cols = _headline_columns(data, name, methods)
  out = [
    "### Headline: forget p(true) and robustness, mean over seeds\n",
    "Forget p(true) after the edit in each format the unedited model answers above chance; relearning"
    " on the held-out half of the forget set after the attack, the probe on the forget facts (whole-set"
    " splits: the held-out half); \"same mask\": seeds in which the method trained exactly fact lookup's"
    " mask. Intervals: the tables below.\n",
    "| method | seeds | same mask | trained parameters | " + " | ".join(t for _, t in cols) + " |",
    "|---|---|---|---|" + "---|" * len(cols),
  ]
  for m in methods:
    seeds = len(data.values[(name, m, "forget_standard")])
    jaccard = data.values.get((name, m, MASK_JACCARD), {})
    same = "-" if m == UNEDITED or not jaccard else str(len(same_mask_seeds(data, name, m)))
    params = data.values.get((name, m, "trained_parameters"), {})
    params_text = "-" if not params else f"{np.mean(list(params.values())):,.0f}"
    cells = []
    for metric, _ in cols:
      by_seed = data.values.get((name, m, metric))
      cells.append(_value_text(metric, float(np.mean(list(by_seed.values()))) if by_seed else None))
    out.append(f"| {m} | {seeds} | {same} | {params_text} | " + " | ".join(cells) + " |")
  out.append("")
  return "\n".join(out)


def per_seed_markdown(data: StudyData, setting: StudySetting) -> str:
  """The headline's metrics for every finished cell, with what it trained and its c_f."""
  name = setting.name
  summaries = {(s["method"], s["seed"]): s for s in data.summaries if s["setting"] == name}
  if not summaries:
    return ""
  methods = [m for m in data.config.methods if any(k[0] == m for k in summaries)]
  cols = _headline_columns(data, name, methods, every_attack=True)
  out = [
    "### Per seed\n",
    "| method | seed | units trained | Jaccard with fact lookup | c_f | " + " | ".join(t for _, t in cols) + " |",
    "|---|---|---|---|---|" + "---|" * len(cols),
  ]
  for m in methods:
    for seed in sorted(seed for method, seed in summaries if method == m):
      s = summaries[(m, seed)]
      units = _units_text(s) + (f" (results of {s['reused_from']})" if "reused_from" in s else "")
      jaccard = s["metrics"].get(MASK_JACCARD)
      cells = [_value_text(metric, data.values.get((name, m, metric), {}).get(seed)) for metric, _ in cols]
      out.append(
        f"| {m} | {seed} | {units} | {'-' if jaccard is None else f'{jaccard:.3f}'} |"
        f" {s['spec']['edit'].get('forget_coef', '-'):g} | " + " | ".join(cells) + " |"
      )
  out.append("")
  return "\n".join(out)


def setting_markdown(data: StudyData, setting: StudySetting) -> str:
  """Validity, the three tables (mean [t-interval]) and the argmax table of a setting."""
  out = [f"## {setting.name} ({setting.task}, split {setting.split})\n"]
  methods = [
    m for m in (UNEDITED,) + data.config.methods if any(k[0] == setting.name and k[1] == m for k in data.values)
  ]
  if not methods:
    return "\n".join(out + ["No finished cells yet.\n"])
  seeds = sorted({seed for (s, _, _), v in data.values.items() if s == setting.name for seed in v})
  out.append(
    f"Seeds with results: {seeds}. Cells: `mean [{data.config.confidence:.0%} t-interval over seeds]`, cut"
    " to the metric's range ([0, 1] for probabilities); `(n=1)`: one seed, no interval yet.\n"
  )
  if get_task(setting.task).whole_set_split(setting.split):
    out.append(
      "Whole-set split: every seed edits and evaluates the same two halves (the first and second half of"
      " the set); a seed changes the maintain split, the training order, the random baselines and the"
      " attacks, so the intervals do not cover the choice of facts.\n"
    )
  headline = headline_markdown(data, setting)
  if headline:
    out.append(headline)
  formats = _formats(data, setting.name)
  out.append("Format validity (unedited model above chance on maintain facts, Wilson 95% on argmax):\n")
  out.append("| format | valid in seeds | unedited argmax accuracy (mean over seeds) | chance |")
  out.append("|---|---|---|---|")
  invalid = _invalid_formats(data, setting.name)
  for f in formats:
    k, n = data.format_valid(setting.name, f)
    if n == 0:
      continue
    per_seed = [v[f] for v in data.validity[setting.name].values() if f in v]
    out.append(
      f"| {f} | {k}/{n} | {np.mean([v['argmax_accuracy'] for v in per_seed]):.3f} |"
      f" {np.mean([v['chance'] for v in per_seed]):.3f} |"
    )
  out.append("")
  mark = lambda metric: (
    f"{metric} ✗"
    if _column_format(metric) in invalid
    or any(metric.startswith(f"relearn_{k}_forget_{f}_") for k in ("lora", "full") for f in invalid)
    else metric
  )
  for title, cols in table_columns(data, setting.name):
    if not cols:
      continue
    out.append(f"### {title}\n")
    out.append("| method | " + " | ".join(mark(c) for c in cols) + " |")
    out.append("|---|" + "---|" * len(cols))
    for m in methods:
      out.append(f"| {m} | " + " | ".join(_fmt_interval(data.interval(setting.name, m, c), c) for c in cols) + " |")
    out.append("")
  # Argmax versions of Tables 1 and 2 (Table 3's other-format maintain columns are in study.csv).
  argmax_cols = [
    f"{c}_argmax"
    for _, cols in table_columns(data, setting.name)[:2]
    for c in cols
    if f"{c}_argmax" in set(data.metrics(setting.name))
  ]
  if argmax_cols:
    out.append("### Argmax accuracies (same cells)\n")
    out.append("| method | " + " | ".join(mark(c[: -len("_argmax")]) + " (argmax)" for c in argmax_cols) + " |")
    out.append("|---|" + "---|" * len(argmax_cols))
    for m in methods:
      out.append(
        f"| {m} | " + " | ".join(_fmt_interval(data.interval(setting.name, m, c), c) for c in argmax_cols) + " |"
      )
    out.append("")
  if invalid:
    out.append(
      f"✗ format where the unedited model is at chance in at least one seed ({sorted(invalid)}):"
      " its numbers are reported but no conclusion is drawn from them.\n"
    )
  per_seed = per_seed_markdown(data, setting)
  if per_seed:
    out.append(per_seed)
  return "\n".join(out)


def _plotted_interval(data: StudyData, setting: str, method: str, metric: str):
  """The interval a figure draws: as the tables show it, cut to the metric's range."""
  iv = data.interval(setting, method, metric)
  return None if iv is None else clipped_to_range(iv, metric)


def _series(data: StudyData, setting: str, method: str, metrics: Sequence[str]):
  xs, mean, lo, hi = [], [], [], []
  for i, metric in enumerate(metrics):
    iv = _plotted_interval(data, setting, method, metric)
    if iv is None:
      continue
    xs.append(i)
    mean.append(iv.mean)
    lo.append(iv.mean if iv.lo is None else iv.lo)
    hi.append(iv.mean if iv.hi is None else iv.hi)
  return xs, mean, lo, hi


def _color(config: StudyConfig, method: str) -> str:
  """One colour per method across every figure (the unedited control in black)."""
  if method == UNEDITED:
    return "black"
  return f"C{config.methods.index(method) % 10}"


def copied_methods(data: StudyData, setting: str) -> dict[str, str]:
  """Methods whose every finished cell in `setting` took another method's results.

  A cell that would make exactly a finished cell's edit reuses its results
  (`runner.find_twin`, which only picks cells that ran, so the summary's `reused_from`
  names the method that ran). When that holds in every seed of a method, its numbers are
  the other method's: figures draw them once, under the other method's name. Returns
  {copied method: the method that ran}.
  """
  sources: dict[str, set[str | None]] = {}
  for s in data.summaries:
    if s["setting"] == setting:
      sources.setdefault(s["method"], set()).add(s.get("reused_from"))
  return {m: next(iter(r)) for m, r in sources.items() if len(r) == 1 and None not in r}


def _methods_with(data: StudyData, setting: str, metric: str) -> list[str]:
  return [m for m in (UNEDITED,) + data.config.methods if (setting, m, metric) in data.values]


def plotted_methods(data: StudyData, setting: str, metric: str) -> list[tuple[str, str]]:
  """(method, legend label) of each line or point a figure draws for `metric`.

  Methods that only copy another's results (`copied_methods`) are not drawn again (their
  identical line would hide the other's); the method that ran names them in its label.
  """
  copies = copied_methods(data, setting)
  drawn = [m for m in _methods_with(data, setting, metric) if m not in copies]
  out = []
  for m in drawn:
    same = [c for c, r in copies.items() if r == m and (setting, c, metric) in data.values]
    out.append((m, m if not same else f"{m} (= {', '.join(same)}: the same edit)"))
  return out


def _plot_methods(ax, data: StudyData, setting: str, metrics: Sequence[str], xs: Sequence[int], band_alpha: float):
  """One line per method (mean over seeds at each x, its interval as a band)."""
  for m, label in plotted_methods(data, setting, metrics[0]):
    measured, mean, lo, hi = _series(data, setting, m, metrics)
    x = [xs[i] for i in measured]
    color = _color(data.config, m)
    ax.plot(x, mean, marker="o", ms=3, label=label, color=color, ls="--" if m == UNEDITED else "-")
    ax.fill_between(x, lo, hi, alpha=band_alpha, color=color, lw=0)


def _legend_outside(ax) -> None:
  # Ten methods' lines fill the axes wherever a legend goes; beside them it hides none.
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def plot_relearning(data: StudyData, setting: str, path: pathlib.Path) -> bool:
  """The paper's Figs 2-3: held-out forget p(true) vs attack step, per method."""
  kinds = [k for k in ("lora", "full") if _relearn_steps(data, setting, k)]
  if not kinds:
    return False
  plt = io.pyplot()
  fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), sharey=True, squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    steps = _relearn_steps(data, setting, kind)
    metrics = [f"relearn_{kind}_forget_step{s}" for s in steps]
    _plot_methods(ax, data, setting, metrics, steps, band_alpha=0.12)
    ax.set_title(f"{setting}: relearning ({kind})", fontsize=9)
    ax.set_xlabel("attack step")
    ax.set_ylim(0, 1)
  axes[0][0].set_ylabel("held-out forget p(true), standard format")
  _legend_outside(axes[0][-1])
  io.save_figure(fig, path)
  return True


def plot_probes(data: StudyData, setting: str, path: pathlib.Path) -> bool:
  """The paper's Fig 4: latent-probe accuracy vs the true answer by layer, per method."""
  layers = sorted(
    {int(m[len("probe_true_layer") :]) for m in data.metrics(setting) if m.startswith("probe_true_layer")}
  )
  if not layers:
    return False
  plt = io.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  metrics = [f"probe_true_layer{r:02d}" for r in layers]
  _plot_methods(ax, data, setting, metrics, layers, band_alpha=0.10)
  chance = data.interval(setting, UNEDITED, "probe_chance")
  if chance is not None:
    ax.axhline(chance.mean, color="gray", lw=1, ls=":")
  ax.set_xlabel("residual stream (0 = embeddings, i = after block i-1)")
  ax.set_ylabel("probe accuracy on forget facts vs true answer")
  ax.set_ylim(0, 1)
  ax.set_title(f"{setting}: latent knowledge by layer", fontsize=9)
  _legend_outside(ax)
  io.save_figure(fig, path)
  return True


def plot_formats_vs_side_effects(data: StudyData, setting: str, path: pathlib.Path) -> bool:
  """Forget p(true) in each non-standard format vs side effects (retain KL, maintain)."""
  formats = [f for f in _forget_formats(data, setting) if f != "standard" and f"forget_{f}" in data.metrics(setting)]
  xs_metrics = [m for m in ("retain_kl", "maintain_standard") if m in data.metrics(setting)]
  if not formats or not xs_metrics:
    return False
  plt = io.pyplot()
  fig, axes = plt.subplots(
    len(xs_metrics), len(formats), figsize=(3.6 * len(formats), 3.2 * len(xs_metrics)), squeeze=False
  )
  for row, xm in enumerate(xs_metrics):
    for col, f in enumerate(formats):
      ax = axes[row][col]
      for m, label in plotted_methods(data, setting, f"forget_{f}"):
        ix, iy = _plotted_interval(data, setting, m, xm), _plotted_interval(data, setting, m, f"forget_{f}")
        if ix is None or iy is None:
          continue
        err = lambda iv: None if iv.lo is None else [[iv.mean - iv.lo], [iv.hi - iv.mean]]
        ax.errorbar(
          ix.mean,
          iy.mean,
          xerr=err(ix),
          yerr=err(iy),
          fmt="o",
          ms=4,
          capsize=2,
          color=_color(data.config, m),
          label=label if row == col == 0 else None,
        )
        ax.annotate(m, (ix.mean, iy.mean), fontsize=6, xytext=(3, 3), textcoords="offset points")
      k, n = data.format_valid(setting, f)
      ax.set_title(f"{f}" + ("" if n and k == n else " (unedited at chance)"), fontsize=8)
      ax.set_xlabel(xm, fontsize=8)
      ax.set_ylim(0, 1)
      if col == 0:
        ax.set_ylabel("forget p(true)", fontsize=8)
  axes[0][0].legend(fontsize=6, loc="best")
  fig.suptitle(
    f"{setting}: forget p(true) in other formats vs side effects (mean, {data.config.confidence:.0%} t-interval)",
    fontsize=9,
  )
  fig.tight_layout()
  io.save_figure(fig, path)
  return True


def study_markdown(
  data: StudyData,
  figures: Mapping[str, list[str]],
  title: str = "Reproduction study",
  claim_lists: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
) -> str:
  """study.md: per setting the tables, figures and claims; the cells and their cost.

  `claim_lists`: (claims, claims at matched hyperparameters) when the caller already
  computed them (`write_outputs` also writes them to claims.json); else computed here.
  """
  cfg = data.config
  total = len(cfg.cells())
  done = len(data.summaries)
  model = data.summaries[0]["spec"]["model"] if data.summaries else cfg.base.get("model", "?")
  out = [
    f"# {title}\n",
    f"Model `{model}`; {done} of {total} cells finished ({len(cfg.settings)} settings x"
    f" {len(cfg.methods)} methods x {len(cfg.seeds)} seeds).\n",
    "Accuracies are probabilities: sports answers normalized over the candidate sports (letter-MC over the"
    " option letters); CounterFact (except letter-MC) the full-vocabulary probability of the first target"
    " token. `_argmax` columns are the matching argmax accuracies (CounterFact: top-1 over the vocabulary)."
    " Forget metrics are on the edited facts (whole-sport settings: the held-out half; `forget_train_*`,"
    " `edit_train_*`: the half the edit trained on); relearning and soft-prompt metrics on the held-out half"
    " of the forget set after the attack; probe metrics on the forget facts (whole-sport settings: the"
    " held-out half, the probes fit on the maintain facts and the trained half), counting only rows whose"
    " class the probes were fit on (`probe_prior_*`: always predicting the most frequent training class)."
    " CounterFact `forget_neighborhood`: p(true) of other subjects' prompts that share the relation, a side"
    " effect, not a forget format. `unedited` rows are the unedited model under the same evaluation and"
    " attacks.\n",
  ]
  for setting in cfg.settings:
    out.append(setting_markdown(data, setting))
    for name in figures.get(setting.name, []):
      out.append(f"![{name}](figures/{name})\n")
  main_claims, matched_claims = claim_lists or (claims(data), claims(data, matched=True))
  out.append("## Claims of the paper\n")
  out.append(verdict_rule(cfg.confidence))
  out.append(claims_markdown(main_claims))
  out.append("### The same claims at matched edit hyperparameters (a control)\n")
  out.append(
    "Fact lookup's mask trained with each comparator's own edit hyperparameters, taken from the cells"
    " that trained exactly that mask with that config (seeds without one are left out): what the"
    " localization alone does, without the per-family tuning.\n"
  )
  if _same_verdicts(matched_claims, main_claims):
    # E.g. when the families' tuned values agree: fact lookup's own cells are the matched
    # ones, and repeating every table would hide that nothing differs.
    out.append(
      "Identical to the claims above, every verdict and interval: each comparator's cells were trained"
      " with fact lookup's edit hyperparameters, so fact lookup's own cells are the matched ones.\n"
    )
  else:
    out.append(claims_markdown(matched_claims))
  for setting in cfg.settings:
    contrast = same_mask_contrasts(data, setting)
    if contrast is not None:
      out.append(same_mask_markdown(contrast))
    baselines = baseline_contrasts(data, setting)
    if baselines is not None:
      out.append(baseline_markdown(baselines))
  out.append("## Cells\n")
  out.append(
    f"`{MASK_JACCARD}`: the share of the weights trained by the cell or by its seed's fact-lookup mask that"
    " both train (Jaccard index by weight count; 1 = the same mask).\n"
  )
  out.append("| setting | method | seed | mask | trained parameters | units trained | FLU layers | Jaccard with fact lookup | cell seconds |")
  out.append("|---|---|---|---|---|---|---|---|---|")
  for s in data.summaries:
    jaccard = s["metrics"].get(MASK_JACCARD)
    mask = s["mask_name"] + (f" (results of {s['reused_from']}: the same edit)" if "reused_from" in s else "")
    out.append(
      f"| {s['setting']} | {s['method']} | {s['seed']} | {mask} | {s['trained_parameters']:,} |"
      f" {_units_text(s)} | {s['flu_layers']} | {'-' if jaccard is None else f'{jaccard:.3f}'} |"
      f" {s['cell_seconds']:.0f} |"
    )
  out.append(stage_time_markdown(data.summaries))
  return "\n".join(out) + "\n"


def _units_text(summary: Mapping[str, Any], max_listed: int = 6) -> str:
  """A cell's trained units and the matrices outside whole units ("-": not recorded)."""
  if "mask_units" not in summary:
    return "-"
  parts = list(summary["mask_units"]) + list(summary.get("mask_other_matrices", []))
  text = ", ".join(parts[:max_listed])
  return text + (f" (+{len(parts) - max_listed} more)" if len(parts) > max_listed else "")


def _nested_order(keys: Sequence[tuple[int, str | None, str]]) -> list[tuple[int, str | None, str]]:
  """(depth, parent, stage) keys as a tree: each stage right after its parent's earlier
  children, the rest in first-seen order. Cells run different inner stages (each method
  localizes under "cell mask"), so first-seen order alone would list a later cell's
  inner stage under whichever stage happened to come last."""
  rank = {key: i for i, key in enumerate(keys)}
  first_of = {}  # (depth, stage) -> its first key, the row its children go under
  for key in keys:
    first_of.setdefault((key[0], key[2]), key)

  def path(key):
    depth, parent, _ = key
    parent_key = first_of.get((depth - 1, parent)) if depth > 0 else None
    return (path(parent_key) if parent_key else ()) + (rank[key],)

  return sorted(keys, key=path)


def stage_time_markdown(summaries: Sequence[Mapping[str, Any]], max_depth: int = 1) -> str:
  """Median seconds per stage over the cells that recorded their stages ("" if none did).

  Depth 0 is a run's own stages (edit, evaluations, the robustness suite per model, the
  study's cell mask), depth 1 their inner stages (the suite's attacks and evaluations,
  the mask's localization), each listed under its parent. A stage read back from an
  earlier attempt or shared with another cell takes near zero, so medians, not means.
  """
  timed = [s for s in summaries if s.get("stage_seconds")]
  if not timed:
    return ""
  order: list[tuple[int, str | None, str]] = []
  per_stage: dict[tuple[int, str | None, str], list[float]] = {}
  for s in timed:
    seen: dict[tuple[int, str | None, str], float] = {}
    for entry in s["stage_seconds"]:
      key = (int(entry["depth"]), entry.get("parent"), str(entry["stage"]))
      if key[0] > max_depth:
        continue
      seen[key] = seen.get(key, 0.0) + float(entry["seconds"])
    for key, seconds in seen.items():
      if key not in per_stage:
        order.append(key)
        per_stage[key] = []
      per_stage[key].append(seconds)
  lines = [
    "\n## Where a cell's time goes\n",
    f"Median over the {len(timed)} cells that recorded their stages (a cell's attempts summed; a"
    " stage's inner stages indented below it, e.g. the robustness suite's attacks).\n",
    "| stage | median seconds | cells |",
    "|---|---|---|",
  ]
  for depth, parent, name in _nested_order(order):
    values = per_stage[(depth, parent, name)]
    lines.append(f"| {'&nbsp;' * 4 * depth}{name} | {float(np.median(values)):.1f} | {len(values)} |")
  return "\n".join(lines) + "\n"


def _same_verdicts(matched: Sequence[Mapping[str, Any]], main: Sequence[Mapping[str, Any]]) -> bool:
  """Whether every matched-hyperparameter claim has the main protocol's verdict and details."""
  by_key = {(c["setting"], c["claim"]): (c["verdict"], c["details"]) for c in main}
  return bool(matched) and all(by_key.get((c["setting"], c["claim"])) == (c["verdict"], c["details"]) for c in matched)


def write_outputs(config: StudyConfig, out_dir: pathlib.Path) -> StudyData:
  """study.csv, study.md and the figures from the finished cells' summaries."""
  data = collect(config, out_dir)
  io.write_text(out_dir / "study.csv", csv_text(data.rows()))
  figures: dict[str, list[str]] = {}
  for setting in config.settings:
    for kind, plot in (
      ("relearning", plot_relearning),
      ("probes", plot_probes),
      ("formats_vs_side_effects", plot_formats_vs_side_effects),
    ):
      name = f"{setting.name}_{kind}.png"
      if plot(data, setting.name, out_dir / "figures" / name):
        figures.setdefault(setting.name, []).append(name)
  claim_lists = claims(data), claims(data, matched=True)
  io.write_text(out_dir / "study.md", study_markdown(data, figures, claim_lists=claim_lists))
  io.write_json(out_dir / "claims.json", claim_lists[0] + claim_lists[1])
  return data
