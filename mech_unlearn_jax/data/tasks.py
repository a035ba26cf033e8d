"""Tasks: what differs between sports facts, CounterFact and later fact sets.

A `Task` supplies everything a stage needs to know about a kind of fact, so the
stages never branch on the task's name:

  * `load(data)`: the facts of the table named by the data config;
  * `knowledge_format(data)`: the prompt format the knowledge filter scores, with the
    *evaluation's* candidate answers by default (a filter over other candidates than
    the evaluation would call facts "known" that the evaluation starts at chance);
  * `known_measure(data)`: which probability the filter thresholds;
  * `train_format(split)`: the standard prompt the edit trains on;
  * `eval_formats(facts, split, seed)`: every prompt format of the evaluation;
  * `make_split(pool, name, seed, metadata)`;
  * `attribute_labels(facts)`: probe targets of the fact-lookup probes;
  * `answer_classes()` / `answer_label(answer)`: the closed answer set of the latent
    probes (sports: the 4 sports incl. golf, so edit targets have a class too);
  * `first_token_only`: whether answers are scored by their first token.

Register a new task with `register_task`; `get_task(name)` looks one up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from mech_unlearn_jax.data import facts as facts_lib
from mech_unlearn_jax.data import formats as formats_lib
from mech_unlearn_jax.data import splits as splits_lib


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which facts, which split, which knowledge filter.

  Attributes:
    task: a registered task name (`TASKS`).
    sports_source: "embedded" (the packaged table of 1051 athletes) or a CSV/parquet
      path or `datasets` source in the reference schema.
    counterfact_path, counterfact_mc_path: CounterFact with prompts, MC questions.
    split: first_<N> / a sport name (sports) / first_<N> (CounterFact).
    known_threshold: facts whose p(true) reaches this are "known".
    known_measure: "candidates" (p normalized over the candidate answers) or
      "full_vocab" (full-vocabulary p of the answer token). CounterFact always uses
      the full vocabulary (its candidates are one true and one false target).
    known_candidates: sports only: "evaluation" (the 4 sports of the evaluation,
      golf included: the filter and the evaluation agree) or "three_sports" (the
      reference's 3-way filter).
    max_facts: read only the first rows of the table (0: all).
    max_pool: cap the known pool (0: no cap).
    max_maintain_eval: maintain facts evaluated per format.
    sequential_rounds: CounterFact: edit this many consecutive forget sets of the
      split's size, each round starting from the previous round's model.
  """

  task: str = "sports"
  sports_source: str = "embedded"
  counterfact_path: str = "../shared/data/reference/counterfact_with_prompts.csv"
  counterfact_mc_path: str = "../shared/data/reference/counterfact_mc_questions.parquet"
  split: str = "first_16"
  known_threshold: float = 0.5
  known_measure: Literal["candidates", "full_vocab"] = "candidates"
  known_candidates: Literal["evaluation", "three_sports"] = "evaluation"
  max_facts: int = 0
  max_pool: int = 0
  max_maintain_eval: int = 64
  sequential_rounds: int = 1

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
    if not 0.0 <= self.known_threshold <= 1.0:
      raise ValueError(f"known_threshold must be in [0, 1], got {self.known_threshold}")
    for name in ("max_facts", "max_pool", "max_maintain_eval"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.sequential_rounds < 1:
      raise ValueError(f"sequential_rounds must be >= 1, got {self.sequential_rounds}")


class Task:
  """Base class; see the module docstring for what a task supplies."""

  name: str = ""
  first_token_only: bool = False

  def load(self, data: DataConfig) -> list[Any]:
    raise NotImplementedError

  def knowledge_format(self, data: DataConfig) -> formats_lib.PromptFormat:
    raise NotImplementedError

  def known_measure(self, data: DataConfig) -> str:
    """Attribute of `scoring.FactScores` the knowledge filter thresholds."""
    return "prob_full" if data.known_measure == "full_vocab" else "prob_normalized"

  def train_format(self, split_name: str, seed: int) -> formats_lib.PromptFormat:
    raise NotImplementedError

  def eval_formats(self, facts: Sequence[Any], split: splits_lib.Split, seed: int) -> dict[str, formats_lib.PromptFormat]:
    raise NotImplementedError

  def make_split(self, pool: Sequence[Any], name: str, seed: int, metadata: dict[str, Any]) -> splits_lib.Split:
    raise NotImplementedError

  def attribute_labels(self, facts: Sequence[Any]) -> tuple[np.ndarray, tuple[str, ...]]:
    """(class index per fact, class names) of the true attribute."""
    raise NotImplementedError

  def answer_classes(self, facts: Sequence[Any]) -> tuple[str, ...]:
    """The closed answer set latent probes classify into."""
    return self.attribute_labels(facts)[1]

  def true_answer(self, fact: Any) -> str:
    raise NotImplementedError

  def whole_set_split(self, split_name: str) -> bool:
    """True when forget_train and forget_eval are disjoint halves (generalization)."""
    return False

  def localize_format(self) -> formats_lib.PromptFormat:
    """The standard prompt localization traces (its candidates set the logit diff)."""
    raise NotImplementedError

  def usable_facts(self, format_name: str, facts: Sequence[Any]) -> list[Any]:
    """The facts a format can be asked about (an inner join with what it needs)."""
    return list(facts)

  def fact_batch(self, tokenizer: Any, fmt: formats_lib.PromptFormat, facts: Sequence[Any],
                 targets: Sequence[str] | None = None, answer: str = "correct"):
    """Prompts of `facts` in `fmt` -> a `FactBatch` whose answer is the true or edit answer."""
    from mech_unlearn_jax.evals import formats_eval  # pylint: disable=g-import-not-at-top

    prompts = fmt.format_batch(list(facts), targets)
    batch, _ = formats_eval.prompts_to_batch(tokenizer, prompts, answer, self.first_token_only)
    return batch


class SportsTask(Task):
  """Athletes and their sport (METHOD §1.1)."""

  name = "sports"
  first_token_only = False

  def load(self, data):
    return facts_lib.load_sports_facts(None if data.sports_source == "embedded" else data.sports_source)

  def knowledge_format(self, data):
    with_golf = data.known_candidates == "evaluation"
    return formats_lib.sports_formats(include_golf=with_golf)["standard"]

  def localize_format(self):
    # The reference's metric: true sport minus the mean of the two other sports.
    return formats_lib.sports_formats(include_golf=False)["standard"]

  def train_format(self, split_name, seed):
    # Whole-sport splits inject "golf", which must be a candidate answer.
    with_golf = split_name in splits_lib.WHOLE_SPORT_SPLITS
    return formats_lib.sports_formats(include_golf=with_golf, seed=seed)["standard"]

  def eval_formats(self, facts, split, seed):
    return formats_lib.sports_formats(include_golf=True, seed=seed)

  def make_split(self, pool, name, seed, metadata):
    return splits_lib.make_sports_split(pool, name, seed=seed, metadata=metadata)

  def attribute_labels(self, facts):
    names = tuple(facts_lib.SPORTS)
    return np.array([names.index(f.sport) for f in facts], np.int32), names

  def answer_classes(self, facts):
    return tuple(facts_lib.SPORTS_WITH_GOLF)

  def true_answer(self, fact):
    return fact.sport

  def whole_set_split(self, split_name):
    return split_name in splits_lib.WHOLE_SPORT_SPLITS


class CounterFactTask(Task):
  """CounterFact rewrites (METHOD §1.2); answers scored by their first token."""

  name = "counterfact"
  first_token_only = True

  def load(self, data):
    if not data.counterfact_path:
      raise ValueError("config.data.counterfact_path must name the CounterFact table for task 'counterfact'")
    return facts_lib.load_counterfact(data.counterfact_path, data.counterfact_mc_path or None)

  def knowledge_format(self, data):
    return formats_lib.CounterFactPromptFormat(name="standard", field="prompt")

  def known_measure(self, data):
    # Candidates are (true, false): a normalized p would call half the facts known.
    return "prob_full"

  def train_format(self, split_name, seed):
    return formats_lib.CounterFactPromptFormat(name="standard", field="prompt")

  def localize_format(self):
    return formats_lib.CounterFactPromptFormat(name="standard", field="prompt")

  def usable_facts(self, format_name, facts):
    # Some facts have no MC question: they drop out of the MC format (n is reported).
    if format_name == "mc":
      return [f for f in facts if f.mc is not None]
    return list(facts)

  def eval_formats(self, facts, split, seed):
    return formats_lib.counterfact_formats(split.select(facts, "few_shot"), seed)

  def make_split(self, pool, name, seed, metadata):
    return splits_lib.make_counterfact_split(pool, name, seed=seed, metadata=metadata)

  def attribute_labels(self, facts):
    # The true objects as classes (many relations share few objects, e.g. languages).
    names = tuple(sorted({f.target_true.strip() for f in facts}))
    return np.array([names.index(f.target_true.strip()) for f in facts], np.int32), names

  def true_answer(self, fact):
    return fact.target_true


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
  """Adds a task under `task.name` (e.g. the planted-facts task)."""
  TASKS[task.name] = task
  return task


register_task(SportsTask())
register_task(CounterFactTask())


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
  return TASKS[name]
