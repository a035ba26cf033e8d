"""Accuracy of facts under every prompt format, and whether a format is valid.

A robustness claim in a format means something only if the *unedited* model answers
that format above chance (METHOD §4). `format_validity` states it with a Wilson 95%
interval on argmax accuracy over the candidates; reports draw conclusions only from
formats whose interval lies above chance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mech_unlearn_jax.batch import FactBatch, make_fact_batch
from mech_unlearn_jax.data.formats import FormattedPrompt, PromptFormat
from mech_unlearn_jax.evals import scoring


# Formats whose answer is an option letter: their "accuracy" is p normalized over the
# letters for every task (a letter's full-vocabulary p says little about the choice).
LETTER_FORMATS = ("mc",)


def accuracy_fields(full_vocabulary: bool, fmt: str) -> tuple[str, str]:
  """(probability field, argmax field) of a `FormatScore` that is the paper's
  "accuracy" in format `fmt`: with `full_vocabulary` (CounterFact) the full-vocabulary
  p of the first target token and top-1 over the vocabulary, except in letter formats;
  otherwise (sports) p and argmax normalized over the candidate answers."""
  if full_vocabulary and fmt not in LETTER_FORMATS:
    return "prob_full", "argmax_full"
  return "prob_normalized", "argmax_candidates"


def prompts_to_batch(
    tokenizer: Any,
    prompts: Sequence[FormattedPrompt],
    answer: str = "correct",
    first_token_only: bool = False,
) -> tuple[FactBatch, np.ndarray]:
  """A `FactBatch` whose answer is each prompt's correct (or edit) candidate.

  Returns the batch and a boolean array of which prompts were kept: prompts without an
  edit candidate are dropped when `answer == "edit"`.
  """
  if answer not in ("correct", "edit"):
    raise ValueError(f"answer must be 'correct' or 'edit', got {answer!r}")
  keep = np.array([answer == "correct" or p.edit_index is not None for p in prompts], bool)
  rows = [p for p, k in zip(prompts, keep) if k]
  if not rows:
    return None, keep
  answer_ids, wrong_ids = [], []
  for p in rows:
    ids = p.candidate_token_ids(tokenizer, first_token_only=first_token_only)
    index = p.correct_index if answer == "correct" else p.edit_index
    answer_ids.append(ids[index])
    wrong_ids.append([i for j, i in enumerate(ids) if j != index and i != ids[index]])
  batch = make_fact_batch(
      tokenizer, [p.text for p in rows], [p.subject for p in rows], answer_ids, wrong_ids,
      pad_id=getattr(tokenizer, "pad_id", 0), multiple=16,
  )
  return batch, keep


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion."""
  if n == 0:
    return (0.0, 1.0)
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, centre - half), min(1.0, centre + half))


@dataclasses.dataclass(frozen=True)
class FormatScore:
  """Mean scores of one (format, fact set, answer) cell."""

  format: str
  facts: str
  answer: str
  n: int
  prob_normalized: float
  prob_full: float
  argmax_candidates: float
  argmax_full: float
  chance: float
  # Facts behind the n prompts (CounterFact: 2 paraphrases, 10 neighborhood prompts
  # per fact); None in cells recorded before it was (then n stands in).
  num_facts: int | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def evaluate_format(
    model: Any,
    tokenizer: Any,
    fmt: PromptFormat,
    facts: Sequence[Any],
    facts_name: str,
    answer: str = "correct",
    edit_targets: Sequence[str | None] | None = None,
    first_token_only: bool = False,
    batch_size: int = 32,
) -> FormatScore | None:
  """Scores `facts` in `fmt` toward their correct or edit answers (None if empty)."""
  if not facts:
    return None
  prompts = fmt.format_batch(list(facts), edit_targets)
  batch, keep = prompts_to_batch(tokenizer, prompts, answer, first_token_only)
  if batch is None:
    return None
  scores = scoring.score_facts(model, batch, chunk_size=batch_size)
  chance = float(np.mean([1.0 / len(p.candidate_answers) for p in prompts]))
  s = scores.summary()
  return FormatScore(
      format=fmt.name, facts=facts_name, answer=answer, n=s["n"],
      prob_normalized=s["prob_normalized"], prob_full=s["prob_full"],
      argmax_candidates=s["argmax_candidates"], argmax_full=s["argmax_full"], chance=chance,
      num_facts=len({p.fact_index for p, k in zip(prompts, keep) if k}),
  )


def format_validity(score: FormatScore) -> dict[str, Any]:
  """Is the unedited model above chance in this format? (Wilson 95% on argmax.)

  Argmax is over the candidate answers (CounterFact prompts: true vs false target,
  chance 0.5; letter multiple choice: the option letters). The interval counts facts, not prompts: a fact's several prompts (paraphrases,
  neighborhood prompts) are not independent draws, so their accuracy enters as that
  many facts' worth of evidence, which widens the interval where prompts outnumber facts.
  """
  n = score.num_facts or score.n
  low, high = wilson_interval(score.argmax_candidates * n, n)
  return {
      "format": score.format,
      "n": score.n,
      "num_facts": n,
      "argmax_accuracy": score.argmax_candidates,
      "interval95": [low, high],
      "chance": score.chance,
      "valid": low > score.chance,
  }
