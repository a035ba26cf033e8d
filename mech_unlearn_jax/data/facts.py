"""Fact tables: sports athletes and CounterFact, loaded through `datasets`.

Every loader returns a list of frozen records (`SportsFact`, `CounterFactFact`) in file
order, validated so that scoring, localization and editing can trust them: a bad
table fails here with an error naming the file, the column and the (0-based data) row.

Sources are local files (CSV, TSV, Parquet, JSON/JSONL, chosen by extension) or, when
a string is not an existing path and has no table extension, a `datasets` hub id
(needs network). Missing local files raise `FileNotFoundError`.

Embedded sports table: `athletes.csv` ships inside this package and is the default of
`load_sports_facts()`.
README: athletes.csv was written by this project from public knowledge (no external
dataset was copied): about a thousand well-known NBA, MLB and NFL players, stars and
Hall of Famers old and current, each listed with the one sport they played
professionally. Athletes who played two of these sports professionally (minor leagues
included) and names shared by notable players of different sports were left out on
purpose. `inject_sport_without_golf` is a seeded random other sport among the three,
never the true sport; rows are in a seeded random order so that "first N" splits mix
sports.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from mech_unlearn_jax.data.list_repr import parse_list_repr

SPORTS: tuple[str, ...] = ("basketball", "baseball", "football")
GOLF = "golf"
SPORTS_WITH_GOLF: tuple[str, ...] = SPORTS + (GOLF,)

EMBEDDED_ATHLETES = "athletes.csv"

DuplicatePolicy = Literal["error", "keep_first"]

_BUILDER_BY_SUFFIX = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
}


class FactsDataError(ValueError):
  """A fact table is malformed; the message names the source, column and row."""


@dataclasses.dataclass(frozen=True)
class SportsFact:
  """One athlete and their sport.

  Attributes:
    athlete: the name as written in the table (surrounding whitespace removed).
    sport: one of `SPORTS` (lowercase).
    inject_sport_without_golf: fixed edit target (another of `SPORTS`), or None when
      the table has no such column.
    row_index: 0-based data row in the source table (stable across filtering).
    inject_sport_with_golf: the reference's other fixed target (may be "golf"), or None.
  """

  athlete: str
  sport: str
  inject_sport_without_golf: str | None
  row_index: int
  inject_sport_with_golf: str | None = None

  @property
  def key(self) -> str:
    """Identifier used by splits (athletes are unique within a table)."""
    return self.athlete

  @property
  def subject(self) -> str:
    return self.athlete


@dataclasses.dataclass(frozen=True)
class CounterFactMC:
  """A multiple-choice rewording of a CounterFact fact.

  `target_true` and `targets_false` are option texts without a leading space; in about
  5% of the reference rows `targets_false[0]` is not the fact's `target_false`.
  """

  question: str
  target_true: str
  targets_false: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CounterFactFact:
  """One CounterFact fact.

  Attributes:
    prompt_id: the fact's id (row of the full 21919-fact table; unique).
    prompt: subject + relation with the subject filled in, no trailing space.
    subject: the subject exactly as it appears in `prompt` (surrounding whitespace
      removed; the files add a leading space when the subject is mid-sentence).
    target_true: the true object as a continuation, with its leading space (" French").
    target_false: the requested rewrite, same convention (" English").
    paraphrase_prompts: prompts that restate the fact (2 in the reference).
    neighborhood_prompts: other subjects, same relation, same *true* object (~10).
    relation_id: Wikidata relation id (e.g. "P103"), or None if the table lacks it.
    row_index: 0-based data row in the source table.
    mc: the joined multiple-choice question, or None.
  """

  prompt_id: int
  prompt: str
  subject: str
  target_true: str
  target_false: str
  paraphrase_prompts: tuple[str, ...]
  neighborhood_prompts: tuple[str, ...]
  relation_id: str | None
  row_index: int
  mc: CounterFactMC | None = None

  @property
  def key(self) -> int:
    """Identifier used by splits."""
    return self.prompt_id


# --------------------------------------------------------------------------- reading


def _builder_for(path: pathlib.Path) -> str | None:
  return _BUILDER_BY_SUFFIX.get(path.suffix.lower())


def _load_columns(source: str | os.PathLike, *, split: str = "train") -> tuple[dict[str, list[Any]], str]:
  """Reads a table with `datasets`; returns (column -> values, label for messages)."""
  import datasets  # heavy import, only when a table is actually read

  path = pathlib.Path(source)
  builder = _builder_for(path)
  text = os.fspath(source)
  # Hub ids are "name" or "owner/name"; anything path-like that is absent is a
  # missing file, not a hub lookup (which would fail later with a network error).
  looks_local = (
      not isinstance(source, str)
      or builder is not None
      or text.startswith(("/", ".", "~"))
      or text.count("/") > 1
      or (os.sep != "/" and os.sep in text)
  )
  if path.exists():
    if path.is_dir():
      raise FactsDataError(f"{path}: is a directory, expected a table file")
    if builder is None:
      raise FactsDataError(
          f"{path}: unknown table type {path.suffix!r}; expected one of {sorted(_BUILDER_BY_SUFFIX)}"
      )
    kwargs: dict[str, Any] = {}
    if builder == "csv":
      # Only empty cells are missing: names like "NA" or "None" stay strings.
      kwargs["keep_default_na"] = False
      if path.suffix.lower() == ".tsv":
        kwargs["sep"] = "\t"
    if path.stat().st_size == 0:
      raise FactsDataError(f"{path}: empty file; expected a {builder} table with a header row and data rows")
    try:
      dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as error:  # datasets wraps parser errors in assorted types
      # The parser's own message (pandas, pyarrow) is on the cause; the wrapper's is generic.
      cause = error.__cause__ or error
      if "corresponds to no data" in str(cause):
        raise FactsDataError(f"{path}: no data rows (only a header?)") from None
      raise FactsDataError(f"{path}: cannot be read as a {builder} table ({type(cause).__name__}: {cause})") from None
    label = str(path)
    if dataset.num_rows == 0:
      raise FactsDataError(f"{path}: no data rows (only a header?)")
  elif looks_local:
    raise FileNotFoundError(f"fact table not found: {path}")
  else:
    dataset = datasets.load_dataset(text, split=split)
    label = f"hub dataset {source!r} (split {split!r})"
  return dataset.to_dict(), label


def _require_columns(columns: Mapping[str, Any], required: Sequence[str], label: str) -> None:
  missing = [c for c in required if c not in columns]
  if missing:
    raise FactsDataError(f"{label}: missing column(s) {missing}; found {sorted(columns)}")


def _is_missing(value: Any) -> bool:
  return value is None or (isinstance(value, float) and np.isnan(value))


def _required_text(value: Any, label: str, column: str, row: int) -> str:
  if _is_missing(value):
    raise FactsDataError(f"{label}: column {column!r}, row {row}: missing value")
  if not isinstance(value, str):
    value = str(value)
  value = value.strip()
  if not value:
    raise FactsDataError(f"{label}: column {column!r}, row {row}: empty string")
  return value


def _sport_value(value: Any, allowed: Sequence[str], label: str, column: str, row: int) -> str:
  sport = _required_text(value, label, column, row).lower()
  if sport not in allowed:
    raise FactsDataError(
        f"{label}: column {column!r}, row {row}: unknown sport {sport!r}; expected one of {list(allowed)}"
    )
  return sport


def _integer_column(values: Sequence[Any], label: str, column: str) -> list[int]:
  """A column of integer ids; a missing, fractional or non-numeric cell names its row."""
  out = []
  for row, value in enumerate(values):
    if isinstance(value, bool) or _is_missing(value):
      raise FactsDataError(f"{label}: column {column!r}, row {row}: expected an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
      out.append(int(value))
      continue
    text = str(value).strip()
    try:
      out.append(int(text))
      continue
    except ValueError:
      pass
    try:
      number = float(text)  # "12.0" from a float column
    except ValueError:
      number = None
    if number is None or not number.is_integer():
      raise FactsDataError(f"{label}: column {column!r}, row {row}: expected an integer, got {value!r}")
    out.append(int(number))
  return out


def _check_duplicates(
    keys: Sequence[Any], label: str, column: str, policy: DuplicatePolicy
) -> list[int]:
  """Returns the rows to keep; raises or warns about repeated keys per `policy`."""
  first_row: dict[Any, int] = {}
  keep: list[int] = []
  repeats: list[tuple[Any, int, int]] = []
  for row, key in enumerate(keys):
    if key in first_row:
      repeats.append((key, first_row[key], row))
      continue
    first_row[key] = row
    keep.append(row)
  if repeats:
    examples = ", ".join(f"{k!r} (rows {a} and {b})" for k, a, b in repeats[:5])
    message = f"{label}: column {column!r}: {len(repeats)} duplicate value(s): {examples}"
    if policy == "error":
      raise FactsDataError(message + "; pass on_duplicate='keep_first' to keep the first occurrence")
    if policy != "keep_first":
      raise ValueError(f"on_duplicate must be 'error' or 'keep_first', got {policy!r}")
    warnings.warn(message + "; keeping the first occurrence", stacklevel=3)
  return keep


# --------------------------------------------------------------------------- sports


def embedded_athletes_path():
  """The `athletes.csv` resource shipped with this package."""
  return importlib.resources.files("mech_unlearn_jax.data").joinpath(EMBEDDED_ATHLETES)


def load_sports_facts(
    source: str | os.PathLike | None = None,
    *,
    on_duplicate: DuplicatePolicy = "error",
    split: str = "train",
) -> list[SportsFact]:
  """Loads athlete -> sport facts.

  Args:
    source: None for the embedded `athletes.csv`; a local table path; or a hub id.
      Required columns: `athlete`, `sport`. Optional: `inject_sport_without_golf`,
      `inject_sport_with_golf` (validated: known sports, never the true sport).
    on_duplicate: a repeated athlete is an error by default, because the same name
      twice means an ambiguous or duplicated fact that would leak between splits;
      "keep_first" keeps the first row and warns.
    split: hub split name (ignored for files).

  Returns:
    SportsFact records in file order; `row_index` is the 0-based data row.
  """
  if source is None:
    with importlib.resources.as_file(embedded_athletes_path()) as path:
      columns, _ = _load_columns(path)
    label = f"embedded {EMBEDDED_ATHLETES}"
  else:
    columns, label = _load_columns(source, split=split)
  _require_columns(columns, ("athlete", "sport"), label)
  num_rows = len(columns["athlete"])
  athletes = [_required_text(v, label, "athlete", row) for row, v in enumerate(columns["athlete"])]
  sports = [_sport_value(v, SPORTS, label, "sport", row) for row, v in enumerate(columns["sport"])]
  injections: dict[str, list[str | None]] = {}
  for column, allowed in (
      ("inject_sport_without_golf", SPORTS),
      ("inject_sport_with_golf", SPORTS_WITH_GOLF),
  ):
    if column not in columns:
      injections[column] = [None] * num_rows
      continue
    values = []
    for row, value in enumerate(columns[column]):
      target = _sport_value(value, allowed, label, column, row)
      if target == sports[row]:
        raise FactsDataError(
            f"{label}: column {column!r}, row {row}: edit target {target!r} equals the true sport"
        )
      values.append(target)
    injections[column] = values
  keep = _check_duplicates(athletes, label, "athlete", on_duplicate)
  return [
      SportsFact(
          athlete=athletes[row],
          sport=sports[row],
          inject_sport_without_golf=injections["inject_sport_without_golf"][row],
          row_index=row,
          inject_sport_with_golf=injections["inject_sport_with_golf"][row],
      )
      for row in keep
  ]


# --------------------------------------------------------------------------- CounterFact


def _string_list(value: Any, label: str, column: str, row: int) -> tuple[str, ...]:
  """A list cell: a numpy/Python repr string (CSV) or a real sequence (Parquet/JSON)."""
  if _is_missing(value):
    raise FactsDataError(f"{label}: column {column!r}, row {row}: missing value")
  if isinstance(value, str):
    try:
      items = parse_list_repr(value)
    except ValueError as error:
      raise FactsDataError(f"{label}: column {column!r}, row {row}: {error}") from None
  elif isinstance(value, (list, tuple, np.ndarray)):
    items = list(value)
  else:
    raise FactsDataError(
        f"{label}: column {column!r}, row {row}: expected a list, got {type(value).__name__}"
    )
  for position, item in enumerate(items):
    if not isinstance(item, str) or not item.strip():
      raise FactsDataError(
          f"{label}: column {column!r}, row {row}: element {position} is not a non-empty string: {item!r}"
      )
  return tuple(items)


def _continuation(value: Any, label: str, column: str, row: int) -> str:
  # Targets are what the model should say right after the prompt, so they carry the
  # separating space; CounterFact's files already include it.
  return " " + _required_text(value, label, column, row)


def _fill_subject(template: str, subject: str) -> str:
  return template.replace("{}", subject) if "{}" in template else template


def load_counterfact_mc(path: str | os.PathLike) -> dict[int, CounterFactMC]:
  """Loads MC questions keyed by `prompt_id` (columns: question, target_true,
  targets_false (3 distractors), prompt_id). A repeated prompt_id is an error."""
  columns, label = _load_columns(path)
  _require_columns(columns, ("question", "target_true", "targets_false", "prompt_id"), label)
  prompt_ids = _integer_column(columns["prompt_id"], label, "prompt_id")
  _check_duplicates(prompt_ids, label, "prompt_id", "error")
  questions: dict[int, CounterFactMC] = {}
  for row, prompt_id in enumerate(prompt_ids):
    distractors = tuple(s.strip() for s in _string_list(columns["targets_false"][row], label, "targets_false", row))
    if len(distractors) != 3:
      raise FactsDataError(
          f"{label}: column 'targets_false', row {row}: expected 3 distractors, got {len(distractors)}"
      )
    questions[prompt_id] = CounterFactMC(
        question=_required_text(columns["question"][row], label, "question", row),
        target_true=_required_text(columns["target_true"][row], label, "target_true", row),
        targets_false=distractors,
    )
  return questions


def _counterfact_records(
    columns: Mapping[str, list[Any]],
    label: str,
    prompt_ids: Sequence[int],
    with_prompt_lists: bool,
    mc: Mapping[int, CounterFactMC] | None,
) -> list[CounterFactFact]:
  _check_duplicates(prompt_ids, label, "prompt_id", "error")
  relation_ids = columns.get("relation_id")
  records = []
  for row, prompt_id in enumerate(prompt_ids):
    subject = _required_text(columns["subject"][row], label, "subject", row)
    prompt = _fill_subject(_required_text(columns["prompt"][row], label, "prompt", row), subject)
    if subject not in prompt:
      raise FactsDataError(f"{label}: column 'prompt', row {row}: subject {subject!r} not in {prompt!r}")
    if with_prompt_lists:
      paraphrases = tuple(
          _fill_subject(p, subject)
          for p in _string_list(columns["paraphrase_prompts"][row], label, "paraphrase_prompts", row)
      )
      neighborhood = _string_list(columns["neighborhood_prompts"][row], label, "neighborhood_prompts", row)
    else:
      paraphrases, neighborhood = (), ()
    relation_id = None
    if relation_ids is not None and not _is_missing(relation_ids[row]) and str(relation_ids[row]).strip():
      relation_id = str(relation_ids[row]).strip()
    records.append(
        CounterFactFact(
            prompt_id=prompt_id,
            prompt=prompt,
            subject=subject,
            target_true=_continuation(columns["target_true"][row], label, "target_true", row),
            target_false=_continuation(columns["target_false"][row], label, "target_false", row),
            paraphrase_prompts=paraphrases,
            neighborhood_prompts=neighborhood,
            relation_id=relation_id,
            row_index=row,
            mc=None if mc is None else mc.get(prompt_id),
        )
    )
  return records


def load_counterfact(
    path_with_prompts: str | os.PathLike, mc_path: str | os.PathLike | None = None
) -> list[CounterFactFact]:
  """Loads CounterFact facts with paraphrase and neighborhood prompts.

  Args:
    path_with_prompts: table with columns prompt, subject, target_true, target_false,
      paraphrase_prompts, neighborhood_prompts (numpy-style list reprs or real lists),
      prompt_id; relation_id is optional. A "{}" in a prompt is filled with the subject.
    mc_path: optional MC question table, joined on prompt_id (`fact.mc`; None for the
      facts it does not cover).
  """
  columns, label = _load_columns(path_with_prompts)
  _require_columns(
      columns,
      ("prompt", "subject", "target_true", "target_false", "paraphrase_prompts", "neighborhood_prompts", "prompt_id"),
      label,
  )
  prompt_ids = _integer_column(columns["prompt_id"], label, "prompt_id")
  mc = None if mc_path is None else load_counterfact_mc(mc_path)
  return _counterfact_records(columns, label, prompt_ids, True, mc)


def load_counterfact_all(
    parquet_path: str | os.PathLike, mc_path: str | os.PathLike | None = None
) -> list[CounterFactFact]:
  """Loads the full CounterFact table (no paraphrase/neighborhood prompts).

  `prompt_id` is the row number (the id the prompt and MC tables use); a `prompt_id`
  column, when present, wins.
  """
  columns, label = _load_columns(parquet_path)
  _require_columns(columns, ("prompt", "subject", "target_true", "target_false"), label)
  num_rows = len(columns["prompt"])
  if "prompt_id" in columns:
    prompt_ids = _integer_column(columns["prompt_id"], label, "prompt_id")
  else:
    prompt_ids = list(range(num_rows))
  mc = None if mc_path is None else load_counterfact_mc(mc_path)
  return _counterfact_records(columns, label, prompt_ids, False, mc)


def facts_by_key(facts: Iterable[SportsFact | CounterFactFact]) -> dict[Any, SportsFact | CounterFactFact]:
  """Maps each fact's `key` (athlete or prompt_id) to the fact."""
  return {fact.key: fact for fact in facts}
