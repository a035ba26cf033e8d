"""What a study is: settings x methods x seeds, and each cell's experiment config.

`StudyConfig` (built from a study config file, `configs/study_sports.py`) names the
settings (a task, a split and experiment overrides), the localization methods and the
seeds, the base experiment and each method family's tuned edit hyperparameters;
`StudyConfig.cell_spec` gives the `ExperimentSpec` one cell runs.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from mech_unlearn_jax import io
from mech_unlearn_jax.experiment import schema
from mech_unlearn_jax.experiment.spec import ExperimentSpec
from mech_unlearn_jax.localize import select


UNEDITED = "unedited"
# A cell's records in its run folder (`Cell.run_dir`): its summary once finished, its
# attempts' times; and the results folder's record of failed cells.
CELL_SUMMARY_FILE, CELL_TIMING_FILE, FAILURES_FILE = "study_cell.json", "study_timing.json", "failures.json"


@dataclasses.dataclass(frozen=True)
class StudySetting:
  """One row group of the paper's tables: a task, a split and experiment overrides.

  Attributes:
    name: the setting's name in tables, paths and `--only_settings`.
    task: the task ("sports", "counterfact").
    split: the split (e.g. "random_16", "basketball").
    overrides: nested experiment keys that differ from the study's base experiment
      (e.g. CounterFact's formats and FLU rule).
  """

  name: str
  task: str
  split: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.name or "/" in self.name or "__" in self.name:
      raise ValueError(f"setting name {self.name!r}: must be non-empty, without '/' or '__'")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the study."""

  setting: str
  method: str
  seed: int

  @property
  def label(self) -> str:
    return f"{self.setting}/{self.method}/seed{self.seed}"

  @property
  def summary_name(self) -> str:
    return f"{self.setting}__{self.method}__seed{self.seed}.json"

  def run_dir(self, workdir: str | pathlib.Path) -> pathlib.Path:
    """The cell's run folder in a study workdir (stages, checkpoints, timing)."""
    return pathlib.Path(workdir) / "cells" / self.setting / self.method / f"seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Settings x methods x seeds on one base experiment.

  Attributes:
    settings: the settings, in the order they run and are reported.
    methods: localization methods (`select.METHODS`), in report order.
    seeds: seeds; each drives the forget draw, training order, random baselines,
      corruption, option shuffles and attacks of its cells.
    base: the base experiment as nested `ExperimentSpec.from_dict` keys (seed,
      method, task and split are set per cell).
    confidence: coverage of the t-intervals over seeds.
    tuned_edit: tuning family (`select.METHOD_FAMILIES`) -> edit keys (lr,
      forget_coef, ...) tuned for that family (METHOD §3); a cell gets its method's
      family's keys over the base's, before the setting's overrides.
    reuse_identical_edits: a cell whose mask and experiment (all but the method's
      name) equal a finished cell's of the same setting and seed makes the same edit
      and the same attacks; it takes that cell's results instead of recomputing them
      (`find_twin`). Off where runs are not deterministic.
  """

  settings: tuple[StudySetting, ...]
  methods: tuple[str, ...] = select.METHODS
  seeds: tuple[int, ...] = (0, 1, 2)
  base: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  confidence: float = 0.95
  tuned_edit: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  reuse_identical_edits: bool = True

  def __post_init__(self):
    if not self.settings:
      raise ValueError("a study needs at least one setting")
    names = [s.name for s in self.settings]
    if len(set(names)) != len(names):
      raise ValueError(f"setting names must be unique, got {names}")
    bad = [m for m in self.methods if m not in select.METHODS]
    if bad or not self.methods:
      raise ValueError(f"methods: unknown or none {bad}; expected some of {select.METHODS}")
    if UNEDITED in self.methods or len(set(self.methods)) != len(self.methods):
      raise ValueError(f"methods must be distinct localization methods, got {self.methods}")
    if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
      raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds}")
    if not 0.0 < self.confidence < 1.0:
      raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
    bad = sorted(set(self.tuned_edit) - set(select.METHOD_FAMILIES))
    if bad:
      raise ValueError(f"tuned_edit: unknown tuning famil(ies) {bad}; expected some of {sorted(select.METHOD_FAMILIES)}")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "StudyConfig":
    """From a study ConfigDict's `to_dict()` (see `configs/study_sports.py`).

    Expected keys: `base` (an experiment config), `settings` ({name: {task, split,
    overrides}}), `setting_order` (names; default: the settings' key order),
    `methods`, `seeds`, optionally `confidence`, `tuned_edit` and `reuse_identical_edits`.
    """
    if hasattr(values, "to_dict"):
      values = values.to_dict()
    unknown = sorted(
      set(values)
      - {"base", "settings", "setting_order", "methods", "seeds", "confidence", "tuned_edit", "reuse_identical_edits"}
    )
    if unknown:
      raise schema.ConfigError(f"unknown study config key(s) {['config.' + k for k in unknown]}")
    settings = dict(values.get("settings") or {})
    order = list(values.get("setting_order") or settings)
    missing = [n for n in order if n not in settings]
    extra = [n for n in settings if n not in order]
    if missing or extra:
      raise schema.ConfigError(
        f"config.setting_order {order} must name every setting of config.settings {list(settings)} once"
      )
    parsed = []
    for name in order:
      s = dict(settings[name])
      bad = sorted(set(s) - {"task", "split", "overrides"})
      if bad or "task" not in s or "split" not in s:
        raise schema.ConfigError(f"config.settings.{name}: expected keys task, split, overrides; got {sorted(s)}")
      parsed.append(StudySetting(name=name, task=s["task"], split=s["split"], overrides=dict(s.get("overrides") or {})))
    methods = values.get("methods", select.METHODS)
    seeds = values.get("seeds", (0, 1, 2))
    if isinstance(methods, str):
      methods = [m.strip() for m in methods.split(",") if m.strip()]
    if isinstance(seeds, str):
      seeds = [int(x) for x in seeds.split(",") if x.strip()]
    try:
      config = cls(
        settings=tuple(parsed),
        methods=tuple(methods),
        seeds=tuple(int(x) for x in seeds),
        base=dict(values.get("base") or {}),
        confidence=float(values.get("confidence", 0.95)),
        tuned_edit={k: dict(v) for k, v in (values.get("tuned_edit") or {}).items()},
        reuse_identical_edits=bool(values.get("reuse_identical_edits", True)),
      )
    except ValueError as e:
      raise schema.ConfigError(f"config: {e}") from None
    for cell in config.cells():  # every cell's experiment must be valid before any work
      config.cell_spec(cell)
    return config

  def setting(self, name: str) -> StudySetting:
    """The setting called `name`."""
    for s in self.settings:
      if s.name == name:
        return s
    raise KeyError(f"no setting {name!r}; the study has {[s.name for s in self.settings]}")

  def experiment_dict(self, setting: StudySetting, method: str, seed: int) -> dict[str, Any]:
    """The nested experiment keys of one cell (base, then overrides, then the cell)."""
    tuned = {"edit": dict(self.tuned_edit.get(select.FAMILY_OF[method], {}))}
    merged = _deep_merge(_deep_merge(_plain(self.base), tuned), _plain(setting.overrides))
    merged.setdefault("data", {}).update(task=setting.task, split=setting.split)
    merged.setdefault("localize", {})["method"] = method
    merged["seed"] = seed
    return merged

  def cell_spec(self, cell: Cell) -> ExperimentSpec:
    """The cell's ExperimentSpec; a bad key raises naming the setting and the key."""
    setting = self.setting(cell.setting)
    try:
      return ExperimentSpec.from_dict(self.experiment_dict(setting, cell.method, cell.seed))
    except ValueError as e:
      raise schema.ConfigError(f"setting {setting.name!r}, method {cell.method!r}: {e}") from None

  def cells(
    self, only_settings: Sequence[str] = (), only_methods: Sequence[str] = (), only_seeds: Sequence[int] = ()
  ) -> list[Cell]:
    """Cells in run order: setting, then seed, then method (a seed's methods finish
    together, so the first seed gives a complete table early)."""
    for kind, given, known in (
      ("settings", only_settings, [s.name for s in self.settings]),
      ("methods", only_methods, list(self.methods)),
      ("seeds", [int(x) for x in only_seeds], list(self.seeds)),
    ):
      bad = [x for x in given if x not in known]
      if bad:
        raise ValueError(f"--only_{kind}: {bad} not in the study's {kind} {known}")
    return [
      Cell(s.name, m, seed)
      for s in self.settings
      if not only_settings or s.name in only_settings
      for seed in self.seeds
      if not only_seeds or seed in [int(x) for x in only_seeds]
      for m in self.methods
      if not only_methods or m in only_methods
    ]

  def to_json(self) -> dict[str, Any]:
    """The study config as plain JSON (recorded in the workdir's study.json)."""
    return io.to_jsonable(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {k: _plain(v) for k, v in x.items()}
  return x


def _deep_merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
  return out
