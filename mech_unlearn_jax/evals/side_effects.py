"""Side effects of an edit beyond the edited facts: sport trivia and general MC (METHOD §4).

Two multiple-choice evaluations, both k-shot, both scored at the answer position by
comparing the model's next-token distribution over the candidate answers
(`evals/scoring.py`):

(a) Sport trivia (`sport_trivia_eval`): questions whose answer is a sport
    (`side_effect_sport_answers.json`: football, baseball, basketball, tennis). Each
    question lists five sport options (those four and golf, shuffled per question with
    a seed), after five solved examples drawn (seeded, covering as many different
    answers as possible) from questions that are then not evaluated. Scored by the
    sport's name (" football", ...; default, as the reference did) or by letter
    (" A".." E"). Gemma 3 270M, unedited, 80 questions: sport names 36% (95% interval
    27-47%, chance 20%, constant-answer rate 28%); letters 24% (at chance). An edit of athletes'
    sports should leave general sport knowledge alone.
(b) A general-capability benchmark in the MMLU schema (`question`, `choices`, `answer`
    = index or letter; optional `subject`) read with `datasets` from a local
    json/jsonl/csv/parquet file or a hub id (`load_mc_questions`), k-shot with letter
    scoring (`mc_benchmark_eval`).

Both report argmax accuracy over the candidates with a Wilson 95% interval and whether
it lies above chance (`formats_eval.format_validity`), the mean normalized probability
of the right answer, the majority-answer rate (a model that always gives the most
common answer scores this), and per-group (sport / subject) accuracies. Evaluate the
unedited model first: a drop means something only where it was above chance.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from mech_unlearn_jax.batch import make_fact_batch
from mech_unlearn_jax.data.formats import LETTERS, FormattedPrompt, seeded_rng
from mech_unlearn_jax.data.list_repr import parse_list_repr
from mech_unlearn_jax.evals import formats_eval, scoring

SPORT_OPTIONS: tuple[str, ...] = ("football", "baseball", "basketball", "tennis", "golf")
MMLU_HEADER = "The following are multiple choice questions (with answers)."
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class SideEffectDataError(ValueError):
  """A side-effect question file is malformed; the message names the file and row."""


@dataclasses.dataclass(frozen=True)
class MCQuestion:
  """One multiple-choice question.

  Attributes:
    question: the question text.
    choices: option texts in slot order (slot i is letter LETTERS[i]).
    answer_index: the slot of the right option.
    group: what to break accuracy down by (a sport, an MMLU subject), or "".
  """

  question: str
  choices: tuple[str, ...]
  answer_index: int
  group: str = ""

  def __post_init__(self):
    if not 2 <= len(self.choices) <= len(LETTERS):
      raise ValueError(f"question {self.question!r}: needs 2..{len(LETTERS)} choices, got {len(self.choices)}")
    if not 0 <= self.answer_index < len(self.choices):
      raise ValueError(f"question {self.question!r}: answer_index {self.answer_index} outside its choices")

  @property
  def answer(self) -> str:
    return self.choices[self.answer_index]


# ----------------------------------------------------------------------------------
# Prompts and scoring.

Scoring = Literal["letter", "text"]


def mc_block(question: MCQuestion, scoring_by: Scoring, solved: bool) -> str:
  """"Question: ...", the lettered options, then "Answer:" (+ the answer if solved)."""
  lines = [f"Question: {question.question}"]
  lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices)]
  if not solved:
    lines.append("Answer:")
  elif scoring_by == "letter":
    lines.append(f"Answer: {LETTERS[question.answer_index]}")
  else:
    lines.append(f"Answer: {question.answer}")
  return "\n".join(lines)


def mc_prompt(
    question: MCQuestion, shots: Sequence[MCQuestion], scoring_by: Scoring = "letter", header: str = ""
) -> FormattedPrompt:
  """The k-shot prompt for `question` and its candidate answers.

  Letter scoring: candidates " A", " B", ... (one per choice). Text scoring: " " +
  each choice (each must be one token, or its first token is used; see
  `score_mc`).
  """
  blocks = ([header] if header else []) + [mc_block(s, scoring_by, True) for s in shots]
  blocks.append(mc_block(question, scoring_by, False))
  if scoring_by == "letter":
    candidates = tuple(" " + LETTERS[i] for i in range(len(question.choices)))
  elif scoring_by == "text":
    candidates = tuple(" " + c for c in question.choices)
  else:
    raise ValueError(f"scoring must be 'letter' or 'text', got {scoring_by!r}")
  return FormattedPrompt(
      text="\n\n".join(blocks), candidate_answers=candidates, correct_index=question.answer_index,
  )


def _candidate_rows(tokenizer, prompts: Sequence[FormattedPrompt], first_token_only: bool):
  answers, wrongs = [], []
  for p in prompts:
    ids = p.candidate_token_ids(tokenizer, first_token_only=first_token_only)
    if len(set(ids)) != len(ids):
      raise ValueError(
          f"candidates {p.candidate_answers} share a token for this tokenizer; use letter scoring"
      )
    answers.append(ids[p.correct_index])
    wrongs.append([i for j, i in enumerate(ids) if j != p.correct_index])
  return answers, wrongs


def score_mc(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[FormattedPrompt],
    batch_size: int = 16,
    length_multiple: int = 64,
    first_token_only: bool = False,
) -> scoring.FactScores:
  """Scores MC prompts (answer = the correct candidate), in the order given.

  Prompts are grouped by token length rounded up to `length_multiple`, so a benchmark
  with long and short prompts pads each group only to its own length and compiles
  one scorer per group length.
  """
  if not prompts:
    raise ValueError("score_mc got no prompts")
  answers, wrongs = _candidate_rows(tokenizer, prompts, first_token_only)
  lengths = np.array([len(tokenizer.encode(p.text, add_bos=True)) for p in prompts])
  padded = -(-lengths // length_multiple) * length_multiple
  pad_id = getattr(tokenizer, "pad_id", 0)
  parts: dict[int, scoring.FactScores] = {}
  order = []
  for width in sorted(set(padded.tolist())):
    rows = np.flatnonzero(padded == width)
    batch = make_fact_batch(
        tokenizer, [prompts[i].text for i in rows], [None] * rows.size,
        [answers[i] for i in rows], [wrongs[i] for i in rows], pad_id=pad_id, length=int(width),
    )
    parts[width] = scoring.score_facts(model, batch, chunk_size=batch_size)
    order.extend(rows.tolist())
  inverse = np.argsort(np.asarray(order))
  merged = {}
  for field in dataclasses.fields(scoring.FactScores):
    values = [getattr(parts[w], field.name) for w in sorted(parts)]
    if field.name == "candidate_probs":
      width = max(v.shape[1] for v in values)
      values = [np.pad(v, ((0, 0), (0, width - v.shape[1]))) for v in values]
    merged[field.name] = np.concatenate(values)[inverse]
  return scoring.FactScores(**merged)


@dataclasses.dataclass(frozen=True)
class MCEvalResult:
  """Accuracy of one MC evaluation (JSON-able via `to_json`).

  Attributes:
    name: what was evaluated (e.g. "sport_trivia", a benchmark name).
    scoring: "letter" or "text".
    num_shots: solved examples per prompt.
    n: evaluated questions.
    accuracy: argmax over the candidates equals the right answer.
    interval95: Wilson 95% interval of `accuracy`.
    prob_normalized: mean p(right answer) normalized over the candidates.
    chance: mean 1 / number of choices.
    above_chance: the interval's lower end is above `chance`.
    majority_rate: share of the most common right answer (letter slot for letter
      scoring, answer text otherwise): what a constant answer would score.
    per_group: group -> {"n", "accuracy", "prob_normalized"}.
  """

  name: str
  scoring: str
  num_shots: int
  n: int
  accuracy: float
  interval95: tuple[float, float]
  prob_normalized: float
  chance: float
  above_chance: bool
  majority_rate: float
  per_group: dict[str, dict[str, float]]

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["interval95"] = list(self.interval95)
    return out


def evaluate_mc(
    model: Any,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    shots_for: Any,
    *,
    name: str,
    scoring_by: Scoring = "letter",
    header: str = "",
    batch_size: int = 16,
    first_token_only: bool = False,
) -> MCEvalResult:
  """Scores `questions` with the solved examples `shots_for(question)`; see `MCEvalResult`."""
  if not questions:
    raise ValueError(f"{name}: no questions to evaluate")
  prompts = [mc_prompt(q, shots_for(q), scoring_by, header) for q in questions]
  scores = score_mc(model, tokenizer, prompts, batch_size, first_token_only=first_token_only)
  n = len(questions)
  correct = np.asarray(scores.correct_argmax_candidates, bool)
  chance = float(np.mean([1.0 / len(q.choices) for q in questions]))
  cell = formats_eval.FormatScore(
      format=name, facts="all", answer="correct", n=n,
      prob_normalized=float(scores.prob_normalized.mean()), prob_full=float(scores.prob_full.mean()),
      argmax_candidates=float(correct.mean()), argmax_full=float(scores.correct_argmax_full.mean()),
      chance=chance,
  )
  validity = formats_eval.format_validity(cell)
  keys = [LETTERS[q.answer_index] if scoring_by == "letter" else q.answer for q in questions]
  majority = Counter(keys).most_common(1)[0][1] / n
  groups: dict[str, list[int]] = {}
  for i, q in enumerate(questions):
    groups.setdefault(q.group, []).append(i)
  per_group = {
      g: {
          "n": len(rows),
          "accuracy": float(correct[rows].mean()),
          "prob_normalized": float(scores.prob_normalized[rows].mean()),
      }
      for g, rows in sorted(groups.items())
  }
  return MCEvalResult(
      name=name, scoring=scoring_by, num_shots=len(shots_for(questions[0])), n=n,
      accuracy=float(correct.mean()), interval95=tuple(validity["interval95"]),
      prob_normalized=cell.prob_normalized, chance=chance, above_chance=bool(validity["valid"]),
      majority_rate=float(majority), per_group=per_group,
  )


def pick_few_shot(
    questions: Sequence[MCQuestion], num_shots: int, seed: int, salt: str = "few_shot"
) -> tuple[list[MCQuestion], list[MCQuestion]]:
  """(solved examples, the rest): a seeded pick covering distinct answers first.

  The examples cycle through the right answers' texts in a seeded order, so with five
  shots over four sports every sport is shown at least once; the rest keep their order.
  """
  if not 0 <= num_shots < len(questions):
    raise ValueError(f"num_shots must be in [0, {len(questions)}) for {len(questions)} questions, got {num_shots}")
  order = list(range(len(questions)))
  seeded_rng(seed, salt).shuffle(order)
  by_answer: dict[str, list[int]] = {}
  for i in order:
    by_answer.setdefault(questions[i].answer, []).append(i)
  picked: list[int] = []
  while len(picked) < num_shots:
    for rows in by_answer.values():
      if rows and len(picked) < num_shots:
        picked.append(rows.pop(0))
  chosen = set(picked)
  return [questions[i] for i in picked], [q for i, q in enumerate(questions) if i not in chosen]


def sample_questions(questions: Sequence[MCQuestion], max_questions: int | None, seed: int) -> list[MCQuestion]:
  """At most `max_questions` of `questions`, a seeded sample in the original order."""
  questions = list(questions)
  if max_questions is None or len(questions) <= max_questions:
    return questions
  keep = np.sort(np.random.default_rng(seed).choice(len(questions), max_questions, replace=False))
  return [questions[i] for i in keep]


# ----------------------------------------------------------------------------------
# (a) Sport trivia.


@dataclasses.dataclass(frozen=True)
class SportQuestion:
  """A trivia question whose answer is a sport name."""

  question: str
  answer: str


def load_sport_questions(path: str | os.PathLike) -> list[SportQuestion]:
  """Reads `side_effect_sport_answers.json` (a list of {"question", "answer"})."""
  path = pathlib.Path(path)
  try:
    rows = json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"sport question file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise SideEffectDataError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(rows, list):
    raise SideEffectDataError(f"{path}: expected a JSON list of {{question, answer}} objects")
  out = []
  for i, row in enumerate(rows):
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row.get(k).strip() for k in ("question", "answer")):
      raise SideEffectDataError(f"{path}: row {i} must have non-empty string 'question' and 'answer', got {row!r}")
    out.append(SportQuestion(row["question"].strip(), row["answer"].strip().lower()))
  return out


@dataclasses.dataclass(frozen=True)
class SportTriviaConfig:
  """Settings of `sport_trivia_eval`.

  Attributes:
    options: the sport names offered (every answer must be one of them).
    num_shots: solved examples (held out from evaluation).
    scoring: "sport" (the sport names' tokens after "Answer:", as the reference
      scored: by the sport named in the reply) or "letter" (" A".." E"; Gemma 3 270M
      answers letters at chance, and the sport names above it).
    seed: seeds the solved examples and every question's option order.
    max_questions: evaluate at most this many (a seeded sample of the questions left
      after the held-out examples).
    batch_size: prompts per scoring batch.
  """

  options: tuple[str, ...] = SPORT_OPTIONS
  num_shots: int = 5
  scoring: Literal["letter", "sport"] = "sport"
  seed: int = 0
  max_questions: int | None = None
  batch_size: int = 16

  def __post_init__(self):
    if self.scoring not in ("letter", "sport"):
      raise ValueError(f"SportTriviaConfig.scoring must be 'letter' or 'sport', got {self.scoring!r}")
    if len(set(self.options)) != len(self.options) or len(self.options) < 2:
      raise ValueError(f"SportTriviaConfig.options must be >= 2 distinct sports, got {self.options}")

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["options"] = list(self.options)
    return out


def sport_mc_questions(
    questions: Sequence[SportQuestion], options: Sequence[str], seed: int
) -> list[MCQuestion]:
  """MC questions with `options` shuffled per question (seeded, stable across runs)."""
  out = []
  for i, q in enumerate(questions):
    if q.answer not in options:
      raise SideEffectDataError(f"sport question {i} ({q.question!r}): answer {q.answer!r} is not one of {tuple(options)}")
    shuffled = list(options)
    seeded_rng(seed, "sport_trivia", q.question).shuffle(shuffled)
    out.append(MCQuestion(q.question, tuple(shuffled), shuffled.index(q.answer), group=q.answer))
  return out


def sport_trivia_eval(
    model: Any,
    tokenizer: Any,
    questions: Sequence[SportQuestion] | str | os.PathLike,
    config: SportTriviaConfig = SportTriviaConfig(),
) -> MCEvalResult:
  """Sport-trivia MC accuracy (see the module docstring); `questions` may be a path."""
  if isinstance(questions, (str, os.PathLike)):
    questions = load_sport_questions(questions)
  mc = sport_mc_questions(questions, config.options, config.seed)
  shots, rest = pick_few_shot(mc, config.num_shots, config.seed, "sport_trivia_shots")
  rest = sample_questions(rest, config.max_questions, config.seed)
  return evaluate_mc(
      model, tokenizer, rest, lambda q: shots, name="sport_trivia",
      scoring_by="letter" if config.scoring == "letter" else "text", batch_size=config.batch_size,
  )


# ----------------------------------------------------------------------------------
# (b) General-capability MC benchmarks (MMLU schema) through `datasets`.


def _looks_local(source: str) -> bool:
  # Hub ids are "name" or "owner/name"; anything path-like is a (missing) local file.
  return (
      pathlib.Path(source).suffix.lower() in _BUILDERS
      or source.startswith(("/", ".", "~"))
      or source.count("/") > 1
  )


def _load_rows(source: str | os.PathLike, split: str, name: str | None) -> tuple[list[dict[str, Any]], str]:
  import datasets  # pylint: disable=g-import-not-at-top  (heavy; only when reading)

  text = os.fspath(source)
  path = pathlib.Path(text).expanduser()
  if path.exists():
    builder = _BUILDERS.get(path.suffix.lower())
    if path.is_dir() or builder is None:
      raise SideEffectDataError(f"{path}: expected a file ending in one of {sorted(_BUILDERS)}")
    kwargs = {"keep_default_na": False} if builder == "csv" else {}
    # A single local file has one split, which `datasets` calls "train".
    dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    return dataset.to_list(), str(path)
  if not isinstance(source, str) or _looks_local(text):
    raise FileNotFoundError(f"MC benchmark file not found: {path}")
  dataset = datasets.load_dataset(text, name, split=split)
  return dataset.to_list(), f"hub dataset {text!r} (config {name!r}, split {split!r})"


def _choices(value: Any, label: str) -> tuple[str, ...]:
  if isinstance(value, str):
    # CSV files store lists as Python/numpy reprs.
    try:
      value = parse_list_repr(value)
    except ValueError as e:
      raise SideEffectDataError(f"{label}: cannot read choices {value[:80]!r}: {e}") from None
  if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
    raise SideEffectDataError(f"{label}: choices must be a list of strings, got {value!r}")
  return tuple(c.strip() for c in value)


def _answer_index(value: Any, num_choices: int, label: str) -> int:
  if isinstance(value, str):
    value = value.strip()
    if len(value) == 1 and value.upper() in LETTERS[:num_choices]:
      return LETTERS.index(value.upper())
    if value.isdigit():
      value = int(value)
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < num_choices:
    return int(value)
  raise SideEffectDataError(f"{label}: answer must be an index in 0..{num_choices - 1} or a letter, got {value!r}")


def load_mc_questions(
    source: str | os.PathLike,
    *,
    split: str = "test",
    name: str | None = None,
    question_field: str = "question",
    choices_field: str = "choices",
    answer_field: str = "answer",
    group_field: str | None = "subject",
) -> list[MCQuestion]:
  """MC questions from a local json/jsonl/csv/parquet file or a `datasets` hub id.

  Args:
    source: a file path, or a hub id such as "cais/mmlu" (then `name`, e.g. "all",
      and `split` apply; local files have one split).
    split, name: the hub split and configuration.
    question_field, choices_field, answer_field: the MMLU schema's columns; choices
      are a list (or its repr in CSV files), the answer an index or a letter.
    group_field: column to break accuracy down by (if present), e.g. MMLU's subject.
  """
  rows, label = _load_rows(source, split, name)
  if not rows:
    raise SideEffectDataError(f"{label}: no rows")
  missing = [f for f in (question_field, choices_field, answer_field) if f not in rows[0]]
  if missing:
    raise SideEffectDataError(f"{label}: missing columns {missing}; has {sorted(rows[0])}")
  out = []
  for i, row in enumerate(rows):
    where = f"{label} row {i}"
    question = row[question_field]
    if not isinstance(question, str) or not question.strip():
      raise SideEffectDataError(f"{where}: empty or non-string question")
    choices = _choices(row[choices_field], where)
    answer = _answer_index(row[answer_field], len(choices), where)
    group = str(row.get(group_field, "")) if group_field else ""
    try:
      out.append(MCQuestion(question.strip(), choices, answer, group))
    except ValueError as e:
      raise SideEffectDataError(f"{where}: {e}") from None
  return out


@dataclasses.dataclass(frozen=True)
class MCBenchmarkConfig:
  """Settings of `mc_benchmark_eval`.

  Attributes:
    name: reported name of the benchmark.
    num_shots: solved examples per prompt.
    same_group_shots: take the solved examples from the question's own group (MMLU
      subject) when the pool has enough of them, as MMLU's usual protocol does.
    seed: seeds which examples are solved and the held-out split (no `few_shot` pool).
    max_questions: evaluate at most this many (a seeded sample).
    header: text before the examples ("" for none).
    batch_size: prompts per scoring batch.
  """

  name: str = "mmlu"
  num_shots: int = 5
  same_group_shots: bool = True
  seed: int = 0
  max_questions: int | None = None
  header: str = MMLU_HEADER
  batch_size: int = 8

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def mc_benchmark_eval(
    model: Any,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    config: MCBenchmarkConfig = MCBenchmarkConfig(),
    few_shot: Sequence[MCQuestion] | None = None,
) -> MCEvalResult:
  """k-shot letter-scored accuracy on MMLU-style questions.

  Solved examples come from `few_shot` (e.g. MMLU's "dev" split) or, if None, from
  `config.num_shots` questions held out of `questions` (seeded; one pool per group
  when `same_group_shots`, so each subject keeps its own examples).
  """
  questions = list(questions)
  if few_shot is None:
    few_shot, rest = [], []
    groups: dict[str, list[MCQuestion]] = {}
    for q in questions:
      groups.setdefault(q.group if config.same_group_shots else "", []).append(q)
    for group, members in groups.items():
      if len(members) <= config.num_shots:
        raise ValueError(
            f"{config.name}: group {group!r} has {len(members)} questions, too few to hold out"
            f" {config.num_shots} solved examples; pass a few_shot pool"
        )
      order = list(range(len(members)))
      seeded_rng(config.seed, config.name, "shots", group).shuffle(order)
      held = set(order[: config.num_shots])
      few_shot += [members[i] for i in order[: config.num_shots]]
      rest += [m for i, m in enumerate(members) if i not in held]
  else:
    rest = questions
    if len(few_shot) < config.num_shots:
      raise ValueError(f"{config.name}: few_shot has {len(few_shot)} questions, fewer than num_shots={config.num_shots}")
  rest = sample_questions(rest, config.max_questions, config.seed)
  pool_by_group: dict[str, list[MCQuestion]] = {}
  for q in few_shot:
    pool_by_group.setdefault(q.group, []).append(q)
  order = list(few_shot)
  seeded_rng(config.seed, config.name, "order").shuffle(order)

  def shots_for(q: MCQuestion) -> list[MCQuestion]:
    own = pool_by_group.get(q.group, []) if config.same_group_shots else []
    pool = own if len(own) >= config.num_shots else order
    return [s for s in pool if s != q][: config.num_shots]

  return evaluate_mc(
      model, tokenizer, rest, shots_for, name=config.name, scoring_by="letter",
      header=config.header, batch_size=config.batch_size,
  )

