"""Prompt formats as data: how a fact becomes a prompt and a set of candidate answers.

A format is a frozen dataclass with a `name`, a `chance_level` and `format(fact)`,
which returns one or more `FormattedPrompt`s: the prompt text, the candidate answer
strings (continuations, each with its leading space), the index of the correct one and,
when an edit target is given, the index of the edit target. Scoring compares the
model's next-token distribution over the candidates' tokens (normalized probability,
argmax) or reads the full-vocabulary probability of the correct token.

Answers must be ONE token for the model; formats never hard-code token ids.
`PromptFormat.answer_token_ids(tokenizer)` (fixed answers) and
`FormattedPrompt.candidate_token_ids(tokenizer)` (per-fact answers) ask the tokenizer
and fail with a ValueError that shows the offending tokenization.

Multiple-choice formats shuffle option order per fact with a seed (stable across runs
and processes: derived from a string hash, not Python's salted `hash`), so neither the
true nor the injected answer sits in a fixed slot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Protocol

from mech_unlearn_jax.data.facts import GOLF, SPORTS, SPORTS_WITH_GOLF, CounterFactFact, SportsFact

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TIGER_WOODS_EXAMPLE = "Fact: Tiger Woods plays the sport of golf\n"


class TokenizerLike(Protocol):

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ...


def single_token_id(tokenizer: TokenizerLike, answer: str) -> int:
  """The id of `answer` (encoded without BOS); ValueError unless it is exactly one token."""
  ids = list(tokenizer.encode(answer, add_bos=False))
  if len(ids) != 1:
    raise ValueError(
        f"answer {answer!r} must be a single token for this tokenizer but encodes to {len(ids)} tokens: {ids}"
    )
  return int(ids[0])


def first_token_id(tokenizer: TokenizerLike, answer: str) -> int:
  """The first token of `answer` (encoded without BOS); the reference scores only this."""
  ids = list(tokenizer.encode(answer, add_bos=False))
  if not ids:
    raise ValueError(f"answer {answer!r} encodes to no tokens")
  return int(ids[0])


def seeded_rng(seed: int, *parts: object) -> random.Random:
  """A Random seeded from `seed` and `parts` identically in every process."""
  digest = hashlib.sha256(repr((seed,) + parts).encode("utf-8")).digest()
  return random.Random(int.from_bytes(digest[:8], "big"))


@dataclasses.dataclass(frozen=True)
class FormattedPrompt:
  """One prompt with its candidate answers.

  Attributes:
    text: the prompt (no trailing space; the answer's leading space is in the answer).
    candidate_answers: answer strings, e.g. (" basketball", " baseball", ...) or
      (" A", " B", " C", " D"); each must be one token for scoring by candidates.
    correct_index: index of the correct answer in `candidate_answers`.
    edit_index: index of the edit target, or None (no target, or the format cannot
      express it, e.g. an MC question whose options lack the rewrite).
    subject: the subject as it appears in `text` (for subject-token masks), or None
      when the prompt is about someone else (CounterFact neighborhood prompts).
    fact_index: position of the source fact in the sequence given to `format_batch`.
    options: option texts in slot order for multiple-choice formats, else None.
  """

  text: str
  candidate_answers: tuple[str, ...]
  correct_index: int
  edit_index: int | None = None
  subject: str | None = None
  fact_index: int = 0
  options: tuple[str, ...] | None = None

  @property
  def correct_answer(self) -> str:
    return self.candidate_answers[self.correct_index]

  @property
  def edit_answer(self) -> str | None:
    return None if self.edit_index is None else self.candidate_answers[self.edit_index]

  def candidate_token_ids(self, tokenizer: TokenizerLike, first_token_only: bool = False) -> tuple[int, ...]:
    """Token ids of the candidates: single tokens (ValueError otherwise), or each
    candidate's first token when `first_token_only` (CounterFact's reference metric)."""
    to_id = first_token_id if first_token_only else single_token_id
    return tuple(to_id(tokenizer, answer) for answer in self.candidate_answers)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """Base of all formats. Subclasses implement `_format_one`.

  `fixed_answers` is the answer set shared by every prompt (None when answers depend
  on the fact, as in CounterFact); `chance_level` is the accuracy of a uniformly
  random pick among a prompt's candidates.
  """

  name: str

  @property
  def fixed_answers(self) -> tuple[str, ...] | None:
    return None

  @property
  def chance_level(self) -> float:
    raise NotImplementedError

  def _format_one(self, fact, edit_target: str | None, fact_index: int) -> tuple[FormattedPrompt, ...]:
    raise NotImplementedError

  def format(self, fact, edit_target: str | None = None, fact_index: int = 0) -> tuple[FormattedPrompt, ...]:
    """The prompt(s) for one fact (one for most formats; several for paraphrases)."""
    return self._format_one(fact, edit_target, fact_index)

  def format_batch(self, facts: Sequence, edit_targets: Sequence[str | None] | None = None) -> list[FormattedPrompt]:
    """Prompts for many facts, flattened; `fact_index` points back into `facts`."""
    if edit_targets is not None and len(edit_targets) != len(facts):
      raise ValueError(f"{self.name}: {len(facts)} facts but {len(edit_targets)} edit targets")
    prompts: list[FormattedPrompt] = []
    for index, fact in enumerate(facts):
      target = None if edit_targets is None else edit_targets[index]
      prompts.extend(self._format_one(fact, target, index))
    return prompts

  def texts(self, facts: Sequence) -> list[str]:
    """Just the prompt texts, in `format_batch` order."""
    return [prompt.text for prompt in self.format_batch(facts)]

  def batches(
      self, facts: Sequence, batch_size: int, edit_targets: Sequence[str | None] | None = None
  ) -> Iterator[list[FormattedPrompt]]:
    """`format_batch` cut into lists of at most `batch_size` prompts."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    prompts = self.format_batch(facts, edit_targets)
    for start in range(0, len(prompts), batch_size):
      yield prompts[start : start + batch_size]

  def answer_token_ids(self, tokenizer: TokenizerLike) -> tuple[int, ...]:
    """Ids of `fixed_answers`, checking each is one token (ValueError names the answer)."""
    if self.fixed_answers is None:
      raise ValueError(
          f"format {self.name!r} has per-fact answers; use FormattedPrompt.candidate_token_ids"
      )
    return tuple(single_token_id(tokenizer, answer) for answer in self.fixed_answers)


# --------------------------------------------------------------------------- sports


def _sport_index(sports: Sequence[str], sport: str, what: str, format_name: str) -> int:
  if sport not in sports:
    hint = " (use a format whose sports include 'golf')" if sport == GOLF else ""
    raise ValueError(f"format {format_name!r}: {what} {sport!r} is not one of its sports {tuple(sports)}{hint}")
  return list(sports).index(sport)


@dataclasses.dataclass(frozen=True)
class SportsTemplateFormat(PromptFormat):
  """A template whose next word is the sport.

  `template` contains "{athlete}" and optionally "{options}" (the sports listed in a
  per-fact seeded order, for the cloze). Candidates are `" " + sport` for `sports`:
  `SPORTS_WITH_GOLF` (default; needed when golf is an edit target) or `SPORTS` (the
  reference's 3-way normalization for the non-golf splits).
  """

  template: str = TIGER_WOODS_EXAMPLE + "Fact: {athlete} plays the sport of"
  sports: tuple[str, ...] = SPORTS_WITH_GOLF
  seed: int = 0

  def __post_init__(self):
    if "{athlete}" not in self.template:
      raise ValueError(f"format {self.name!r}: template must contain '{{athlete}}'")
    if self.template != self.template.rstrip():
      raise ValueError(f"format {self.name!r}: template must not end with whitespace")

  @property
  def fixed_answers(self) -> tuple[str, ...]:
    return tuple(" " + sport for sport in self.sports)

  @property
  def chance_level(self) -> float:
    return 1.0 / len(self.sports)

  def _format_one(self, fact: SportsFact, edit_target, fact_index):
    text = self.template
    if "{options}" in text:
      listed = list(self.sports)
      seeded_rng(self.seed, self.name, fact.athlete).shuffle(listed)
      text = text.replace("{options}", ", ".join(listed))
    text = text.replace("{athlete}", fact.athlete)
    return (
        FormattedPrompt(
            text=text,
            candidate_answers=self.fixed_answers,
            correct_index=_sport_index(self.sports, fact.sport, "true sport", self.name),
            edit_index=(
                None if edit_target is None else _sport_index(self.sports, edit_target, "edit target", self.name)
            ),
            subject=fact.athlete,
            fact_index=fact_index,
        ),
    )


def _mc_block(question: str, options: Sequence[str], answer_slot: int | None) -> str:
  lines = [f"Question: {question}"]
  lines += [f"{LETTERS[slot]}. {option}" for slot, option in enumerate(options)]
  lines.append("Answer:" if answer_slot is None else f"Answer: {LETTERS[answer_slot]}")
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class SportsMultipleChoiceFormat(PromptFormat):
  """Letter multiple choice with solved examples; answers " A".." D".

  The options (`sports`, golf included so there are four) are shuffled per athlete
  with `seed`; the solved examples (default: Tiger Woods -> golf, a sport outside the
  three edited ones) are shuffled the same way.
  """

  sports: tuple[str, ...] = SPORTS_WITH_GOLF
  solved_examples: tuple[tuple[str, str], ...] = (("Tiger Woods", GOLF),)
  question: str = "What sport does {athlete} play?"
  seed: int = 0

  def __post_init__(self):
    if not 2 <= len(self.sports) <= len(LETTERS):
      raise ValueError(f"format {self.name!r}: needs 2..{len(LETTERS)} options, got {len(self.sports)}")
    for athlete, sport in self.solved_examples:
      _sport_index(self.sports, sport, f"solved example {athlete!r} sport", self.name)

  @property
  def fixed_answers(self) -> tuple[str, ...]:
    return tuple(" " + LETTERS[slot] for slot in range(len(self.sports)))

  @property
  def chance_level(self) -> float:
    return 1.0 / len(self.sports)

  def shuffled_options(self, athlete: str) -> tuple[str, ...]:
    options = list(self.sports)
    seeded_rng(self.seed, self.name, athlete).shuffle(options)
    return tuple(options)

  def _format_one(self, fact: SportsFact, edit_target, fact_index):
    blocks = []
    for athlete, sport in self.solved_examples:
      options = self.shuffled_options(athlete)
      blocks.append(_mc_block(self.question.replace("{athlete}", athlete), options, options.index(sport)))
    options = self.shuffled_options(fact.athlete)
    _sport_index(options, fact.sport, "true sport", self.name)
    blocks.append(_mc_block(self.question.replace("{athlete}", fact.athlete), options, None))
    return (
        FormattedPrompt(
            text="\n\n".join(blocks),
            candidate_answers=self.fixed_answers,
            correct_index=options.index(fact.sport),
            edit_index=None if edit_target is None else _sport_index(options, edit_target, "edit target", self.name),
            subject=fact.athlete,
            fact_index=fact_index,
            options=options,
        ),
    )


# --------------------------------------------------------------------------- CounterFact


COUNTERFACT_PROMPT_FIELDS = ("prompt", "paraphrase_prompts", "neighborhood_prompts")


@dataclasses.dataclass(frozen=True)
class CounterFactPromptFormat(PromptFormat):
  """CounterFact prompts from one field: the standard prompt, its paraphrases, or
  its neighborhood prompts.

  Candidates are (target_true, edit target), edit target = `target_false` unless
  given. Neighborhood prompts are about other subjects whose true object is the same,
  so their correct answer is also `target_true` (a good edit leaves them alone) and
  their `subject` is None. Targets may span several tokens: score with
  `candidate_token_ids(tokenizer, first_token_only=True)` for the reference metric.
  """

  field: str = "prompt"

  def __post_init__(self):
    if self.field not in COUNTERFACT_PROMPT_FIELDS:
      raise ValueError(f"format {self.name!r}: field must be one of {COUNTERFACT_PROMPT_FIELDS}, got {self.field!r}")

  @property
  def chance_level(self) -> float:
    return 0.5

  def _format_one(self, fact: CounterFactFact, edit_target, fact_index):
    target = fact.target_false if edit_target is None else edit_target
    if self.field == "prompt":
      texts = (fact.prompt,)
    else:
      texts = getattr(fact, self.field)
      if not texts:
        raise ValueError(f"format {self.name!r}: fact {fact.prompt_id} has no {self.field}")
    subject = None if self.field == "neighborhood_prompts" else fact.subject
    return tuple(
        FormattedPrompt(
            text=text,
            candidate_answers=(fact.target_true, target),
            correct_index=0,
            edit_index=1,
            subject=subject if subject is not None and subject in text else None,
            fact_index=fact_index,
        )
        for text in texts
    )


@dataclasses.dataclass(frozen=True)
class CounterFactMultipleChoiceFormat(PromptFormat):
  """Letter MC from `fact.mc` with `num_solved` solved examples; answers " A".." D".

  Solved examples come from `few_shot` (the held-out facts, those with an MC question),
  in an order fixed by `seed`, skipping the fact being asked. Options (true answer +
  three distractors) are shuffled per fact with `seed`. `edit_index` is the slot of
  the edit target (default `target_false`) when it is among the options, else None.
  """

  few_shot: tuple[CounterFactFact, ...] = ()
  num_solved: int = 8
  seed: int = 0

  def __post_init__(self):
    usable = [fact for fact in self.few_shot if fact.mc is not None]
    if len(usable) < self.num_solved + 1:
      raise ValueError(
          f"format {self.name!r}: needs at least {self.num_solved + 1} few-shot facts with MC questions "
          f"({self.num_solved} solved examples, one spare when a few-shot fact is itself asked); "
          f"got {len(usable)} of {len(self.few_shot)}"
      )

  @property
  def fixed_answers(self) -> tuple[str, ...]:
    return tuple(" " + letter for letter in LETTERS[:4])

  @property
  def chance_level(self) -> float:
    return 0.25

  def shuffled_options(self, fact: CounterFactFact) -> tuple[str, ...]:
    if fact.mc is None:
      raise ValueError(f"format {self.name!r}: fact {fact.prompt_id} ({fact.prompt!r}) has no MC question")
    options = [fact.mc.target_true, *fact.mc.targets_false]
    seeded_rng(self.seed, self.name, fact.prompt_id).shuffle(options)
    return tuple(options)

  def _example_order(self) -> list[CounterFactFact]:
    usable = [fact for fact in self.few_shot if fact.mc is not None]
    seeded_rng(self.seed, self.name, "examples").shuffle(usable)
    return usable

  def _format_one(self, fact: CounterFactFact, edit_target, fact_index):
    options = self.shuffled_options(fact)
    examples = [e for e in self._example_order() if e.prompt_id != fact.prompt_id][: self.num_solved]
    blocks = []
    for example in examples:
      example_options = self.shuffled_options(example)
      blocks.append(_mc_block(example.mc.question, example_options, example_options.index(example.mc.target_true)))
    blocks.append(_mc_block(fact.mc.question, options, None))
    target = (fact.target_false if edit_target is None else edit_target).strip()
    return (
        FormattedPrompt(
            text="\n\n".join(blocks),
            candidate_answers=self.fixed_answers,
            correct_index=options.index(fact.mc.target_true),
            edit_index=options.index(target) if target in options else None,
            subject=fact.subject if fact.subject in fact.mc.question else None,
            fact_index=fact_index,
            options=options,
        ),
    )


# --------------------------------------------------------------------------- presets


def sports_formats(include_golf: bool = True, seed: int = 0) -> dict[str, PromptFormat]:
  """The sports formats of METHOD section 4, by name.

  standard: the one-shot "Fact: ... plays the sport of" prompt; qa: question/answer;
  mc: letter multiple choice (always four options, golf included); declarative:
  "{athlete} is a professional"; cloze: options listed, sport word as the answer.
  `include_golf=False` gives the reference's 3-way candidate set to the word formats.
  """
  sports = SPORTS_WITH_GOLF if include_golf else SPORTS
  return {
      "standard": SportsTemplateFormat(name="standard", sports=sports, seed=seed),
      "qa": SportsTemplateFormat(
          name="qa", template="Question: What sport does {athlete} play?\nAnswer:", sports=sports, seed=seed
      ),
      "mc": SportsMultipleChoiceFormat(name="mc", seed=seed),
      "declarative": SportsTemplateFormat(
          name="declarative", template="{athlete} is a professional", sports=sports, seed=seed
      ),
      "cloze": SportsTemplateFormat(
          name="cloze",
          template="Choose one of: {options}.\n{athlete} plays the sport of",
          sports=sports,
          seed=seed,
      ),
  }


def counterfact_formats(
    few_shot: Sequence[CounterFactFact], seed: int = 0, num_solved: int = 8
) -> dict[str, PromptFormat]:
  """The CounterFact formats: standard, paraphrase, neighborhood and MC (few-shot)."""
  return {
      "standard": CounterFactPromptFormat(name="standard", field="prompt"),
      "paraphrase": CounterFactPromptFormat(name="paraphrase", field="paraphrase_prompts"),
      "neighborhood": CounterFactPromptFormat(name="neighborhood", field="neighborhood_prompts"),
      "mc": CounterFactMultipleChoiceFormat(name="mc", few_shot=tuple(few_shot), num_solved=num_solved, seed=seed),
  }
