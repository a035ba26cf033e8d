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


def format_validity(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per format: is the unedited model above chance on maintain facts?"""
  valid = {}
  for c in cells:
    if c["facts"] == "maintain" and c["answer"] == "correct":
      valid[c["format"]] = formats_eval.format_validity(formats_eval.FormatScore(**c))
  return valid


def summarize(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One row per (format, facts, answer): unedited vs edited probability and argmax."""
  rows = []
  index = {(c["format"], c["facts"], c["answer"]): c for c in after["cells"]}
  for c in before["cells"]:
    e = index.get((c["format"], c["facts"], c["answer"]))
    if e is None:
      continue
    rows.append({
        "format": c["format"], "facts": c["facts"], "answer": c["answer"], "n": c["n"],
        "unedited_prob": c["prob_normalized"], "edited_prob": e["prob_normalized"],
        "unedited_argmax": c["argmax_candidates"], "edited_argmax": e["argmax_candidates"],
        "unedited_prob_full": c["prob_full"], "edited_prob_full": e["prob_full"],
    })
  return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], validity: Mapping[str, Any]) -> str:
  lines = [
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
  for section in results.get("extra_sections", []):
    text += "\n" + section
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
  ax.set_ylabel("probability (normalized over candidates)")
  ax.set_ylim(0, 1)
  ax.set_title(title, fontsize=9)
  ax.legend()
  fig.tight_layout()
  io.save_figure(fig, path)


def write_if_changed(path: pathlib.Path, text: str) -> bool:
  """Writes `text` atomically unless the file already holds it; returns whether it wrote."""
  if path.is_file() and path.read_text(encoding="utf-8") == text:
    return False
  io.write_text(path, text)
  return True


def write_report(workdir: pathlib.Path, results: Mapping[str, Any], title: str) -> None:
  """results.json, results.md and results.png (the figure only when the JSON changed)."""
  changed = write_if_changed(workdir / "results.json", io.dumps(results))
  write_if_changed(workdir / "results.md", results_markdown(results))
  if changed or not (workdir / "results.png").is_file():
    plot_results(results["summary"], workdir / "results.png", title)
