"""What the unedited model knows: knowledge-filter counts and accuracy per format.

`run_baseline(...)` scores every sports table and CounterFact file it is given in the
standard format, counts the facts that pass the knowledge filter, then evaluates the
known facts in every prompt format (per sport for sports) and states, per format,
whether the model answers above chance (Wilson 95% interval). Writes
`baseline.json` and `baseline.md`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any


from mech_unlearn_jax import io
from mech_unlearn_jax.data import facts as facts_lib
from mech_unlearn_jax.data import formats as formats_lib
from mech_unlearn_jax.evals import formats_eval, scoring


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
  """Inputs of `run_baseline`.

  Attributes:
    sports_sources: "embedded" and/or CSV paths.
    counterfact_path / counterfact_mc_path: CounterFact with prompts ("" to skip).
    threshold: knowledge filter threshold.
    max_eval_per_sport: known athletes per sport evaluated in every format.
    max_eval_counterfact: known CounterFact facts evaluated in every format.
    seed: option shuffling of MC formats.
  """

  sports_sources: tuple[str, ...] = ("embedded",)
  counterfact_path: str = ""
  counterfact_mc_path: str = ""
  threshold: float = 0.5
  max_eval_per_sport: int = 50
  max_eval_counterfact: int = 64
  seed: int = 0
  batch_size: int = 32


def _p_true(model, tokenizer, fmt, facts, first_token, batch_size):
  batch, _ = formats_eval.prompts_to_batch(tokenizer, fmt.format_batch(facts), "correct", first_token)
  return scoring.score_facts(model, batch, chunk_size=batch_size)


def _cell(score: formats_eval.FormatScore) -> dict[str, Any]:
  v = formats_eval.format_validity(score)
  return {**score.to_json(), "interval95": v["interval95"], "valid": v["valid"]}


def sports_baseline(model, tokenizer, source: str, spec: BaselineSpec) -> dict[str, Any]:
  facts = facts_lib.load_sports_facts(None if source == "embedded" else source)
  three_way = formats_lib.sports_formats(include_golf=False, seed=spec.seed)
  scores = _p_true(model, tokenizer, three_way["standard"], facts, False, spec.batch_size)
  known = [f for f, p in zip(facts, scores.prob_normalized) if p >= spec.threshold]
  full_known = int((scores.prob_full >= spec.threshold).sum())
  out = {
      "source": source, "num_facts": len(facts),
      "argmax_accuracy_3way": float(scores.correct_argmax_candidates.mean()),
      "known_normalized": len(known), "known_full_vocab": full_known,
      "known_per_sport": {s: sum(f.sport == s for f in known) for s in facts_lib.SPORTS},
      "formats": [],
  }
  evaluated = []
  for sport in facts_lib.SPORTS:
    evaluated += [f for f in known if f.sport == sport][: spec.max_eval_per_sport]
  for name, fmt in three_way.items():
    for sport in ("all",) + facts_lib.SPORTS:
      subset = evaluated if sport == "all" else [f for f in evaluated if f.sport == sport]
      score = formats_eval.evaluate_format(model, tokenizer, fmt, subset, sport, batch_size=spec.batch_size)
      if score is not None:
        out["formats"].append(_cell(score))
  return out


def counterfact_baseline(model, tokenizer, spec: BaselineSpec) -> dict[str, Any]:
  facts = facts_lib.load_counterfact(spec.counterfact_path, spec.counterfact_mc_path or None)
  standard = formats_lib.CounterFactPromptFormat(name="standard", field="prompt")
  scores = _p_true(model, tokenizer, standard, facts, True, spec.batch_size)
  known = [f for f, p in zip(facts, scores.prob_full) if p >= spec.threshold]
  out = {
      "num_facts": len(facts), "known_full_vocab": len(known),
      "top1_accuracy": float(scores.correct_argmax_full.mean()), "formats": [],
  }
  few_shot, evaluated = known[-64:], known[: -64][: spec.max_eval_counterfact]
  for name, fmt in formats_lib.counterfact_formats(few_shot, spec.seed).items():
    score = formats_eval.evaluate_format(
        model, tokenizer, fmt, evaluated, "known", first_token_only=True, batch_size=spec.batch_size
    )
    if score is not None:
      out["formats"].append(_cell(score))
  return out


def markdown(result: dict[str, Any]) -> str:
  lines = []
  for s in result.get("sports", []):
    lines += [
        f"### Sports facts: {s['source']} ({s['num_facts']} athletes)",
        f"3-way argmax accuracy {s['argmax_accuracy_3way']:.3f}; known (p >= threshold, normalized over"
        f" the 3 sports): {s['known_normalized']} {s['known_per_sport']}; known by full-vocabulary p:"
        f" {s['known_full_vocab']}",
        "",
        "| format | athletes | n | p(true) | argmax acc | 95% interval | chance | above chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in s["formats"]:
      lo, hi = c["interval95"]
      lines.append(
          f"| {c['format']} | {c['facts']} | {c['n']} | {c['prob_normalized']:.3f} | {c['argmax_candidates']:.3f} |"
          f" [{lo:.2f}, {hi:.2f}] | {c['chance']:.2f} | {'yes' if c['valid'] else 'no'} |"
      )
    lines.append("")
  if "counterfact" in result:
    c = result["counterfact"]
    lines += [
        f"### CounterFact ({c['num_facts']} facts)",
        f"top-1 accuracy (first target token) {c['top1_accuracy']:.3f}; known (full-vocab p >= threshold): {c['known_full_vocab']}",
        "",
        "| format | n | p(true) normalized over (true, false) | p(true) full vocab | argmax acc | 95% interval | chance | above chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in c["formats"]:
      lo, hi = f["interval95"]
      lines.append(
          f"| {f['format']} | {f['n']} | {f['prob_normalized']:.3f} | {f['prob_full']:.3f} | {f['argmax_candidates']:.3f} |"
          f" [{lo:.2f}, {hi:.2f}] | {f['chance']:.2f} | {'yes' if f['valid'] else 'no'} |"
      )
  return "\n".join(lines) + "\n"


def run_baseline(model, tokenizer, spec: BaselineSpec, workdir: str | os.PathLike) -> dict[str, Any]:
  workdir = pathlib.Path(workdir)
  result: dict[str, Any] = {"spec": dataclasses.asdict(spec), "sports": []}
  for source in spec.sports_sources:
    result["sports"].append(sports_baseline(model, tokenizer, source, spec))
  if spec.counterfact_path:
    result["counterfact"] = counterfact_baseline(model, tokenizer, spec)
  io.write_json(workdir / "baseline.json", result)
  io.write_text(workdir / "baseline.md", markdown(result))
  return result
