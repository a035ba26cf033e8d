"""Forget / maintain / few-shot splits of a knowledge-filtered fact pool (METHOD §1).

The pool is the list of facts the edited model knows: `filter_known` keeps facts
whose per-fact probability of the true answer (computed by the scoring code) reaches a
threshold, in file order. Splits then take:

sports
  first_N (first_16, first_64, any N): the first N pool facts, targets =
    `inject_sport_without_golf` (or a seeded random other sport when the table has no
    such column); trained and evaluated on the same facts.
  basketball / baseball / football: every pool athlete of that sport, injected with
    "golf"; trained on the first half (pool order) and evaluated on the held-out
    second half.
  maintain: all other pool athletes (for a whole-sport split: the other sports),
    split 80/20 into train/test with a seeded permutation.

CounterFact
  The last `num_few_shot` (64) pool facts are held out as few-shot examples for MC
  prompts and excluded from forget and maintain; first_N of the rest is the forget set
  (targets = `target_false`); the remainder is maintain, split 80/20.

A `Split` records facts by key (athlete name, or CounterFact prompt_id) with its seed
and sizes, and round-trips through JSON so every run can write the split it used
(`Split.write` is atomic: temp file + os.replace).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from mech_unlearn_jax.data.facts import GOLF, SPORTS, CounterFactFact, SportsFact
from mech_unlearn_jax.data.formats import seeded_rng

WHOLE_SPORT_SPLITS = SPORTS
DEFAULT_MAINTAIN_FRACTION = 0.8
DEFAULT_NUM_FEW_SHOT = 64
SPLIT_FORMAT_VERSION = 1
_FIRST_N = re.compile(r"(first|random)_(\d+)")


def _forget_rows(pool: Sequence[Any], name: str, seed: int) -> list[int]:
  """Pool rows of a first_<N> (the first N) or random_<N> (a seeded draw of N) forget set.

  A random draw keeps pool order, so the same seed always gives the same facts.
  """
  match = _FIRST_N.fullmatch(name)
  kind, count = match.group(1), int(match.group(2))
  if count < 1:
    raise ValueError(f"split {name!r}: N must be positive")
  if len(pool) < count:
    raise _too_small(name, "the forget set", count, len(pool))
  if kind == "first":
    return list(range(count))
  rows = list(range(len(pool)))
  seeded_rng(seed, "forget", name).shuffle(rows)
  return sorted(rows[:count])

Key = str | int


class SplitTooSmallError(ValueError):
  """The filtered pool cannot supply what a split asks for."""


def _too_small(split: str, part: str, needed: int, available: int) -> SplitTooSmallError:
  return SplitTooSmallError(
      f"split {split!r}: {part} needs {needed} facts but the filtered pool has only {available}"
  )


def filter_known(facts: Sequence[Any], p_true: Sequence[float] | np.ndarray, threshold: float = 0.5) -> list[Any]:
  """Facts whose probability of the true answer is >= `threshold`, in input order.

  `p_true[i]` belongs to `facts[i]` (normalized over candidate answers or full-vocab:
  the caller decides). NaN or a length mismatch is an error, not a silent drop.
  """
  probabilities = np.asarray(p_true, dtype=np.float64)
  if probabilities.shape != (len(facts),):
    raise ValueError(f"p_true has shape {probabilities.shape}; expected ({len(facts)},), one per fact")
  bad = np.flatnonzero(~np.isfinite(probabilities))
  if bad.size:
    raise ValueError(f"p_true is not finite at fact index(es) {bad[:10].tolist()}")
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [0, 1], got {threshold}")
  return [fact for fact, p in zip(facts, probabilities) if p >= threshold]


def _as_tuple(values) -> tuple:
  return tuple(values)


@dataclasses.dataclass(frozen=True)
class Split:
  """One experiment's partition of the pool, by fact key.

  Attributes:
    name: "first_16", "first_64", "basketball", ... .
    dataset: "sports" or "counterfact".
    seed: seed of the maintain split (and of drawn targets).
    forget_train / forget_train_targets: facts to edit and their edit targets (sport
      names such as "golf", or CounterFact continuations such as " English").
    forget_eval / forget_eval_targets: facts on which the edit is evaluated (the same
      as forget_train for first_N; the held-out half for whole-sport splits).
    maintain_train / maintain_test: facts whose true answers must survive.
    few_shot: CounterFact facts held out as solved MC examples (empty for sports).
    pool_size: size of the filtered pool the split was made from.
    metadata: free-form JSON-able notes (model, threshold, source file, ...).
  """

  name: str
  dataset: str
  seed: int
  forget_train: tuple[Key, ...]
  forget_train_targets: tuple[str, ...]
  forget_eval: tuple[Key, ...]
  forget_eval_targets: tuple[str, ...]
  maintain_train: tuple[Key, ...]
  maintain_test: tuple[Key, ...]
  few_shot: tuple[Key, ...] = ()
  pool_size: int = 0
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  PARTS = ("forget_train", "forget_eval", "maintain_train", "maintain_test", "few_shot")

  def __post_init__(self):
    if len(self.forget_train) != len(self.forget_train_targets):
      raise ValueError(f"split {self.name!r}: forget_train and its targets differ in length")
    if len(self.forget_eval) != len(self.forget_eval_targets):
      raise ValueError(f"split {self.name!r}: forget_eval and its targets differ in length")

  def keys(self, part: str) -> tuple[Key, ...]:
    if part not in self.PARTS:
      raise ValueError(f"unknown split part {part!r}; expected one of {self.PARTS}")
    return getattr(self, part)

  def select(self, facts: Sequence[Any], part: str) -> list[Any]:
    """The facts of `part`, in split order, looked up by key in `facts`."""
    by_key = {fact.key: fact for fact in facts}
    missing = [key for key in self.keys(part) if key not in by_key]
    if missing:
      raise KeyError(f"split {self.name!r}, {part}: {len(missing)} key(s) not in the given facts, e.g. {missing[:5]}")
    return [by_key[key] for key in self.keys(part)]

  def to_json(self) -> str:
    record = dataclasses.asdict(self)
    record["format_version"] = SPLIT_FORMAT_VERSION
    return json.dumps(record, indent=1, ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> "Split":
    record = json.loads(text)
    version = record.pop("format_version", SPLIT_FORMAT_VERSION)
    if version != SPLIT_FORMAT_VERSION:
      raise ValueError(f"unsupported split format version {version}")
    for field in dataclasses.fields(cls):
      if field.name in record and isinstance(record[field.name], list):
        record[field.name] = tuple(record[field.name])
    return cls(**record)

  def write(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes `to_json()` atomically (`mech_unlearn_jax.io.write_text`)."""
    from mech_unlearn_jax import io  # pylint: disable=g-import-not-at-top

    return io.write_text(path, self.to_json())

  @classmethod
  def read(cls, path: str | os.PathLike) -> "Split":
    return cls.from_json(pathlib.Path(path).read_text(encoding="utf-8"))


def _split_maintain(
    keys: Sequence[Key], seed: int, fraction: float, split_name: str, min_maintain: int, salt: str
) -> tuple[tuple[Key, ...], tuple[Key, ...]]:
  """Seeded train/test split; both parts keep pool order for readability."""
  if len(keys) < min_maintain:
    raise SplitTooSmallError(
        f"split {split_name!r}: the maintain set needs at least {min_maintain} facts but only "
        f"{len(keys)} filtered facts remain outside the forget (and few-shot) sets"
    )
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"maintain_fraction must be in (0, 1), got {fraction}")
  order = list(range(len(keys)))
  seeded_rng(seed, "maintain", salt).shuffle(order)
  num_train = int(round(fraction * len(keys)))
  if len(keys) >= 2:
    num_train = min(max(num_train, 1), len(keys) - 1)
  train_positions = set(order[:num_train])
  train = tuple(k for i, k in enumerate(keys) if i in train_positions)
  test = tuple(k for i, k in enumerate(keys) if i not in train_positions)
  return train, test


def _check_unique_keys(pool: Sequence[Any]) -> None:
  keys = [fact.key for fact in pool]
  if len(set(keys)) != len(keys):
    seen, repeated = set(), []
    for key in keys:
      if key in seen:
        repeated.append(key)
      seen.add(key)
    raise ValueError(f"pool has repeated fact keys, e.g. {repeated[:5]}")


def sports_edit_target(fact: SportsFact, seed: int) -> str:
  """The fact's fixed `inject_sport_without_golf`, else a seeded other sport."""
  if fact.inject_sport_without_golf is not None:
    return fact.inject_sport_without_golf
  others = [sport for sport in SPORTS if sport != fact.sport]
  return seeded_rng(seed, "inject", fact.athlete).choice(others)


def make_sports_split(
    pool: Sequence[SportsFact],
    name: str,
    *,
    seed: int = 0,
    maintain_fraction: float = DEFAULT_MAINTAIN_FRACTION,
    min_maintain: int = 2,
    metadata: dict[str, Any] | None = None,
) -> Split:
  """Builds a sports split ("first_<N>" or a sport name) from a filtered pool."""
  _check_unique_keys(pool)
  match = _FIRST_N.fullmatch(name)
  if match:
    rows = _forget_rows(pool, name, seed)
    forget = [pool[i] for i in rows]
    targets = tuple(sports_edit_target(fact, seed) for fact in forget)
    forget_train = forget_eval = tuple(fact.key for fact in forget)
    forget_train_targets = forget_eval_targets = targets
    chosen = set(rows)
    rest = [fact.key for i, fact in enumerate(pool) if i not in chosen]
  elif name in WHOLE_SPORT_SPLITS:
    of_sport = [fact for fact in pool if fact.sport == name]
    if len(of_sport) < 2:
      raise _too_small(name, f"the whole-sport forget set ({name} athletes, half train / half eval)", 2, len(of_sport))
    half = len(of_sport) // 2
    forget_train = tuple(fact.key for fact in of_sport[:half])
    forget_eval = tuple(fact.key for fact in of_sport[half:])
    forget_train_targets = (GOLF,) * len(forget_train)
    forget_eval_targets = (GOLF,) * len(forget_eval)
    # The held-out half must not be maintained either, so the whole sport is excluded.
    rest = [fact.key for fact in pool if fact.sport != name]
  else:
    raise ValueError(
        f"unknown sports split {name!r}; expected 'first_<N>', 'random_<N>' or one of {WHOLE_SPORT_SPLITS}"
    )
  maintain_train, maintain_test = _split_maintain(rest, seed, maintain_fraction, name, min_maintain, name)
  return Split(
      name=name,
      dataset="sports",
      seed=seed,
      forget_train=forget_train,
      forget_train_targets=forget_train_targets,
      forget_eval=forget_eval,
      forget_eval_targets=forget_eval_targets,
      maintain_train=maintain_train,
      maintain_test=maintain_test,
      pool_size=len(pool),
      metadata=dict(metadata or {}),
  )


def make_counterfact_split(
    pool: Sequence[CounterFactFact],
    name: str,
    *,
    seed: int = 0,
    num_few_shot: int = DEFAULT_NUM_FEW_SHOT,
    maintain_fraction: float = DEFAULT_MAINTAIN_FRACTION,
    min_maintain: int = 2,
    metadata: dict[str, Any] | None = None,
) -> Split:
  """Builds a CounterFact "first_<N>" split; the pool's last `num_few_shot` facts are
  held out as few-shot examples."""
  _check_unique_keys(pool)
  match = _FIRST_N.fullmatch(name)
  if not match or int(match.group(2)) < 1:
    raise ValueError(
        f"unknown CounterFact split {name!r}; expected 'first_<N>' or 'random_<N>' (e.g. first_16, random_16)"
    )
  count = int(match.group(2))
  needed = num_few_shot + count + min_maintain
  if len(pool) < needed:
    raise _too_small(
        name,
        f"{num_few_shot} few-shot + {count} forget + at least {min_maintain} maintain",
        needed,
        len(pool),
    )
  candidates = list(pool[: len(pool) - num_few_shot])
  few_shot = tuple(fact.key for fact in pool[len(pool) - num_few_shot :])
  rows = _forget_rows(candidates, name, seed)
  forget = [candidates[i] for i in rows]
  keys = tuple(fact.key for fact in forget)
  targets = tuple(fact.target_false for fact in forget)
  chosen = set(rows)
  rest = [fact.key for i, fact in enumerate(candidates) if i not in chosen]
  maintain_train, maintain_test = _split_maintain(rest, seed, maintain_fraction, name, min_maintain, "counterfact")
  return Split(
      name=name,
      dataset="counterfact",
      seed=seed,
      forget_train=keys,
      forget_train_targets=targets,
      forget_eval=keys,
      forget_eval_targets=targets,
      maintain_train=maintain_train,
      maintain_test=maintain_test,
      few_shot=few_shot,
      pool_size=len(pool),
      metadata=dict(metadata or {}),
  )
