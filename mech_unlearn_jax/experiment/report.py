"""Tables and figures of a run, built only from the stages' recorded outputs.

Because the report reads nothing but stage outputs, rebuilding it on a finished run
gives byte-identical files; `write_if_changed` then leaves them untouched.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mech_unlearn_jax import io
from mech_unlearn_jax.evals import formats_eval
from mech_unlearn_jax.experiment.layout import RunLayout


def format_validity(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per format: is the unedited model above chance on maintain facts?"""
  valid = {}
  for c in cells:
    if c["facts"] == "maintain" and c["answer"] == "correct":
      valid[c["format"]] = formats_eval.format_validity(formats_eval.FormatScore(**c))
  return valid


def summarize(
    before: Mapping[str, Any], after: Mapping[str, Any], measure: str = "prob_normalized"
) -> list[dict[str, Any]]:
  """One row per (format, facts, answer): unedited vs edited probability and argmax.

  `measure` is the paper's "accuracy": p normalized over the candidate answers
  (sports) or the full-vocabulary p of the first target token (CounterFact, whose
  two candidates would make p(true) + p(false) = 1 and forget = 1 - edit). Letter
  formats (`formats_eval.LETTER_FORMATS`) always read p normalized over the letters;
  each row records the field it used.
  """
  rows = []
  index = {(c["format"], c["facts"], c["answer"]): c for c in after["cells"]}
  for c in before["cells"]:
    e = index.get((c["format"], c["facts"], c["answer"]))
    if e is None:
      continue
    rows.append({
        "format": c["format"], "facts": c["facts"], "answer": c["answer"], "n": c["n"],
        **_probs(c, e, measure),
        "unedited_argmax": c["argmax_candidates"], "edited_argmax": e["argmax_candidates"],
        "unedited_prob_full": c["prob_full"], "edited_prob_full": e["prob_full"],
    })
  return rows


def _field(measure: str, fmt: str) -> str:
  """The cell field holding `measure` in `fmt` (letter formats: normalized over the letters)."""
  return formats_eval.accuracy_fields(measure == "prob_full", fmt)[0]


def _probs(before_cell: Mapping[str, Any], after_cell: Mapping[str, Any], measure: str) -> dict[str, Any]:
  field = _field(measure, before_cell["format"])
  return {"unedited_prob": before_cell[field], "edited_prob": after_cell[field], "measure": field}


def markdown_table(rows: Sequence[Mapping[str, Any]], validity: Mapping[str, Any]) -> str:
  lines = [
      "p = " + _measure_text({r.get("measure", "prob_normalized") for r in rows}) + "\n",
      "| format | facts | answer | n | unedited p | edited p | unedited argmax | edited argmax | format valid (unedited above chance) |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    valid = "yes" if validity.get(r["format"], {}).get("valid") else "no"
    lines.append(
        f"| {r['format']} | {r['facts']} | {r['answer']} | {r['n']} | {r['unedited_prob']:.3f} |"
        f" {r['edited_prob']:.3f} | {r['unedited_argmax']:.3f} | {r['edited_argmax']:.3f} | {valid} |"
    )
  return "\n".join(lines) + "\n"


def results_markdown(results: Mapping[str, Any]) -> str:
  """results.md: the format table, retain-text side effects, the mask."""
  before, after = results["unedited"], results["edited"]
  text = markdown_table(results["summary"], results["format_validity"])
  text += (
      f"\nretain text (held-out): loss {before['retain_text']['loss']:.3f} -> {after['retain_text']['loss']:.3f},"
      f" next-token accuracy {before['retain_text']['accuracy']:.3f} -> {after['retain_text']['accuracy']:.3f},"
      f" KL(original || edited) {after['kl_original_edited']:.4f} nats/token\n"
      f"trained parameters: {results['trained_parameters']:,} ({results['localization']['mask_name']})\n"
  )
  if results.get("sequential_rounds"):
    text += "\n### Sequential editing (standard format, after each round)\n\n"
    text += "| round | facts edited so far | forget p(true) | forget p(edit) | maintain p(true) | KL |\n|---|---|---|---|---|---|\n"
    for r in results["sequential_rounds"]:
      text += (
          f"| {r['round'] + 1} | {r['edited_so_far']} | {_fmt(r.get('standard_forget_correct'))} |"
          f" {_fmt(r.get('standard_forget_edit'))} | {_fmt(r.get('standard_maintain_correct'))} |"
          f" {_fmt(r.get('kl_original_edited'), 4)} |\n"
      )
  formats = results["config"]["eval"]["formats"]
  text += "\n" + robustness_markdown(results.get("robustness", {}), formats, results["format_validity"], _measure(results))
  return text


def plot_results(rows: Sequence[Mapping[str, Any]], path: pathlib.Path, title: str) -> None:
  """Bar chart of unedited vs edited p per (format, facts, answer) row."""
  plt = io.pyplot()
  labels = [f"{r['format']}\n{r['facts']}:{r['answer']}" for r in rows]
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
  ax.bar(x - 0.2, [r["unedited_prob"] for r in rows], 0.4, label="unedited")
  ax.bar(x + 0.2, [r["edited_prob"] for r in rows], 0.4, label="edited")
  ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel(_measure_text({r.get("measure", "prob_normalized") for r in rows}, short=True))
  ax.set_ylim(0, 1)
  ax.set_title(title, fontsize=9)
  ax.legend()
  fig.tight_layout()
  io.save_figure(fig, path)


def _measure(results: Mapping[str, Any]) -> str:
  """The run's measure ("prob_full": CounterFact, "prob_normalized": sports), as
  recorded; results written before it was are read from their summary rows."""
  if "measure" in results:
    return results["measure"]
  fields = {r.get("measure", "prob_normalized") for r in results.get("summary") or [{}]}
  return "prob_full" if "prob_full" in fields else "prob_normalized"


def _measure_text(fields: set[str], short: bool = False) -> str:
  """What the rows' p is, from the fields they used (`short`: a plot's axis label)."""
  if "prob_full" not in fields:
    return "probability (normalized over candidates)" if short else "probability normalized over the candidate answers"
  text = "full-vocabulary probability" + ("" if short else " of the answer's first token")
  if "prob_normalized" in fields:  # letter formats among them
    text += " (letter MC: over the letters)" if short else " (letter multiple choice: normalized over the option letters)"
  return text


def write_if_changed(path: pathlib.Path, text: str) -> bool:
  """Writes `text` atomically unless the file already holds it; returns whether it wrote."""
  if path.is_file() and path.read_text(encoding="utf-8") == text:
    return False
  io.write_text(path, text)
  return True


def write_report(workdir: pathlib.Path, results: Mapping[str, Any], title: str) -> None:
  """results.json, results.md and results.png (the figure only when the JSON changed)."""
  layout = RunLayout(workdir)
  changed = write_if_changed(layout.results_json, io.dumps(results))
  write_if_changed(layout.results_md, results_markdown(results))
  if changed or not layout.results_png.is_file():
    plot_results(results["summary"], layout.results_png, title)
    plot_robustness(results.get("robustness", {}), results["config"]["eval"]["formats"], workdir, _measure(results))


# ----------------------------------------------------------------------------------
# Robustness: relearning, latent probes, soft prompts, side effects.


def coincidence_markdown(coincidence: Mapping[str, Any]) -> str:
  """Pairwise Jaccard index of localizations' masks (`masks.mask_coincidence`) as a table."""
  names = coincidence["names"]
  lines = [
      "Jaccard index of the trained weights (|A and B| / |A or B|, by weight count); 1.000 = the same mask.\n",
      "| method | weights | " + " | ".join(names) + " |",
      "|---|---|" + "---|" * len(names),
  ]
  for name, size, row in zip(names, coincidence["trained_parameters"], coincidence["jaccard"]):
    lines.append(f"| {name} | {size:,} | " + " | ".join(_fmt(v) for v in row) + " |")
  groups = coincidence["identical"]
  lines.append("")
  lines.append("Identical masks: " + ("; ".join(", ".join(g) for g in groups) if groups else "none") + ".")
  return "\n".join(lines) + "\n"


def _cell_p(cells, fmt, answer="correct", measure="prob_normalized"):
  for c in cells:
    if c["format"] == fmt and c["answer"] == answer:
      return c[_field(measure, fmt)]
  return None


def _fmt(x, digits=3):
  return "-" if x is None else f"{x:.{digits}f}"


def relearn_rows(
    robust: Mapping[str, Any], formats: Sequence[str], measure: str = "prob_normalized"
) -> list[dict[str, Any]]:
  """(attacker, model, step) -> held-out forget p(true) per format, and edit p."""
  rows = []
  for attacker in ("relearn_lora", "relearn_full"):
    for model in ("unedited", "edited"):
      res = robust.get(model, {}).get(attacker)
      if not res:
        continue
      for step, ev in sorted(res["curve"].items(), key=lambda kv: int(kv[0])):
        row = {"attacker": attacker.split("_")[1], "model": model, "step": int(step)}
        for f in formats:
          row[f] = _cell_p(ev["cells"], f, measure=measure)
        row["standard_edit"] = _cell_p(ev["cells"], "standard", "edit", measure)
        rows.append(row)
  return rows


def robustness_markdown(
    robust: Mapping[str, Any], formats: Sequence[str], validity: Mapping[str, Any], measure: str = "prob_normalized"
) -> str:
  """The robustness tables of results.md (unedited control next to the edited model)."""
  if not robust:
    return ""
  mark = lambda f: f if validity.get(f, {}).get("valid") else f"{f} (not valid)"
  out = []
  rows = relearn_rows(robust, formats, measure)
  if rows:
    what = "full-vocabulary p(true)" if measure == "prob_full" else "p(true) normalized over candidates"
    out.append(f"### Relearning attack (held-out half of the forget set, {what})\n")
    out.append("| attacker | model | step | " + " | ".join(mark(f) for f in formats) + " | standard: p(edit) |")
    out.append("|---|---|---|" + "---|" * (len(formats) + 1))
    for r in rows:
      out.append(
          f"| {r['attacker']} | {r['model']} | {r['step']} | "
          + " | ".join(_fmt(r[f]) for f in formats) + f" | {_fmt(r['standard_edit'])} |"
      )
    out.append("")
  if any("probes" in robust.get(m, {}) for m in ("unedited", "edited")):
    out.append("### Latent-knowledge probes (last-token residual stream, mean over layers / best layer)\n")
    out.append(
        "| model | probes | held-out maintain acc | forget: acc vs true (mean / max) | forget: acc vs edit (mean / max) |"
        " chance | class prior (true / edit) |"
    )
    out.append("|---|---|---|---|---|---|---|")
    for model in ("unedited", "edited"):
      res = robust.get(model, {}).get("probes")
      if not res:
        continue
      for kind in ("retrained", "transfer"):
        part = res.get(kind)
        if not part:
          continue
        m = part["summary"]
        out.append(
            f"| {model} | {kind} | {_fmt(m.get('heldout_mean'))} | {_fmt(m.get('forget_true_mean'))} /"
            f" {_fmt(m.get('forget_true_max'))} | {_fmt(m.get('forget_edit_mean'))} / {_fmt(m.get('forget_edit_max'))} |"
            f" {_fmt(res.get('chance'))} | {_fmt(res.get('prior_true'))} / {_fmt(res.get('prior_edit'))} |"
        )
    out.append(
        "Accuracies count the held-out and forget rows whose class the probes were fit on (a probe cannot predict"
        " another); class prior: always predicting the most frequent training class, on the same forget rows.\n"
    )
  sp = [(m, k) for m in ("unedited", "edited") for k in ("softprompt_prefix", "softprompt_adapter") if k in robust.get(m, {})]
  if sp:
    what = "full-vocabulary p(true)" if measure == "prob_full" else "p(true) normalized"
    out.append(f"### Soft-prompt attacks (held-out half, {what}; mean ± std over seeded attacks)\n")
    out.append("| model | attack | before | after | argmax after | attacks |")
    out.append("|---|---|---|---|---|---|")
    for model, kind in sp:
      res = robust[model][kind]
      # From the runs, so that results written before a measure was summarized render.
      after = np.array([r["eval"][measure] for r in res["runs"]], np.float64)
      argmax = np.array([r["eval"]["argmax_candidates"] for r in res["runs"]], np.float64)
      spread = float(after.std(ddof=1)) if after.size > 1 else 0.0
      out.append(
          f"| {model} | {kind.split('_')[1]} | {_fmt(res['before_eval'][measure])} |"
          f" {_fmt(float(after.mean()))} ± {_fmt(spread)} | {_fmt(float(argmax.mean()))} | {len(res['runs'])} |"
      )
    out.append("")
  for key, title in (("trivia", "Sports trivia (multiple choice)"), ("mc_benchmark", "General MC benchmark")):
    if any(key in robust.get(m, {}) for m in ("unedited", "edited")):
      out.append(f"### {title}\n")
      out.append("| model | n | accuracy | 95% interval | chance | above chance |")
      out.append("|---|---|---|---|---|---|")
      for model in ("unedited", "edited"):
        res = robust.get(model, {}).get(key)
        if res:
          lo, hi = res["interval95"]
          out.append(
              f"| {model} | {res['n']} | {res['accuracy']:.3f} | [{lo:.2f}, {hi:.2f}] | {res['chance']:.2f} |"
              f" {'yes' if res['above_chance'] else 'no'} |"
          )
      out.append("")
  return "\n".join(out) + "\n"


def plot_robustness(
    robust: Mapping[str, Any], formats: Sequence[str], directory: pathlib.Path, measure: str = "prob_normalized"
) -> None:
  """relearning.png (standard-format p(true) vs attack step) and probes.png (per layer)."""
  plt = io.pyplot()
  rows = relearn_rows(robust, formats, measure)
  if rows:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, attacker in zip(axes, ("lora", "full")):
      for model, style in (("unedited", "--"), ("edited", "-")):
        pts = [(r["step"], r["standard"]) for r in rows if r["attacker"] == attacker and r["model"] == model]
        if pts:
          ax.plot(*zip(*pts), style, marker="o", label=model)
      ax.set_title(f"relearning ({attacker})", fontsize=9)
      ax.set_xlabel("attack step")
      ax.set_ylim(0, 1)
      ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out forget p(true), standard")
    io.save_figure(fig, directory / "relearning.png")
  if any("probes" in robust.get(m, {}) for m in ("unedited", "edited")):
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for model, style in (("unedited", "--"), ("edited", "-")):
      res = robust.get(model, {}).get("probes")
      if res:
        acc = res["retrained"]["forget_true_accuracy"]
        if acc is None:  # no forget row's true class among the probes' training classes
          continue
        ax.plot(range(len(acc)), acc, style, marker="o", ms=3, label=f"{model}: forget facts vs true")
        if model == "edited" and res["retrained"].get("forget_edit_accuracy"):
          ax.plot(range(len(acc)), res["retrained"]["forget_edit_accuracy"], ":", marker="x", ms=3, label="edited: vs edit target")
    ax.axhline(res["chance"], color="gray", lw=1, ls=":")
    ax.set_xlabel("residual stream (0 = embeddings, i = after block i-1)")
    ax.set_ylabel("probe accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    io.save_figure(fig, directory / "probes.png")
