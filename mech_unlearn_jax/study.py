"""The reproduction study: settings x methods x seeds, each cell a full main-job run.

`run_study(config, workdir)` runs every cell of a `StudyConfig` (a setting such as
"16 athletes -> another sport", a localization method, a seed) as one
`experiment.run_experiment` with every robustness stage, then turns the cells'
results into the paper's tables and figures with intervals over seeds:

  workdir/
    shared/knowledge/<task>-<hash>.json      the per-model knowledge filter (every
                                             cell whose model and data agree)
    shared/<setting>-<hash>/seed<k>/evidence   fact-lookup evidence (every method's
                                             budget comes from it)
    shared/<setting>-<hash>/seed<k>/unedited   the unedited model's evaluation and
                                             robustness control
    cells/<setting>/<method>/seed<k>/        the cell's run (stages, checkpoints)
    mask_records/<setting>/<method>/seed<k>/ the cell's localization alone (its mask
                                             record and twin check, `find_twin`)
    results/                                 (or `out_dir`) what a reader wants:
      study.csv        long format: setting, method, seed, metric, value
      study.md         per setting: the paper's three tables (mean and t-interval
                       over seeds), format validity, the claims, cell wall times
      figures/         relearning curves, probe accuracy by layer, forget accuracy
                       in other formats vs side effects
      cells/<setting>__<method>__seed<k>.json   a small summary per finished cell
      shared/          copies of the shared outputs' JSON and score files
                       (`sync_shared`), copied back into a workdir that lacks them

The hashes name the settings' experiment configs, so a changed config never reads
another config's shared outputs. The sampled retain text is cached by the library
per (model, seed) outside the workdir, so it too is computed once per seed.

Twins: a cell whose mask and experiment (all but the method's name) equal a finished
cell's of the same setting and seed takes that cell's results (`find_twin`;
`StudyConfig.reuse_identical_edits`), its summary naming it in `reused_from`.

Resuming: a cell whose summary exists is never rerun (its recorded config must equal
the current one, or the study stops naming the keys that differ); a killed cell
resumes inside `run_experiment` (finished stages are read back, the edit continues
from its checkpoint). The model is loaded once per study (once per seed for "tiny-*"
presets, whose random weights are seeded).

Metrics (`cell_metrics`): accuracies are probabilities, as in the paper: sports
answers normalized over the candidate sports, letter-MC over the option letters;
CounterFact (except letter-MC) the full-vocabulary probability of the first target
token. `<metric>_argmax` is the matching argmax accuracy (CounterFact: top-1 over the
vocabulary). Unedited-model control rows (method "unedited") come from the shared
unedited evaluation and robustness stages.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io as std_io
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mech_unlearn_jax import compile_cache
from mech_unlearn_jax import io
from mech_unlearn_jax import progress
from mech_unlearn_jax.data.tasks import get_task
from mech_unlearn_jax.experiment import run as run_lib
from mech_unlearn_jax.experiment import schema
from mech_unlearn_jax.experiment.spec import ExperimentSpec
from mech_unlearn_jax.localize import baselines as baselines_lib
from mech_unlearn_jax.localize import masks as masks_lib
from mech_unlearn_jax.localize import select

UNEDITED = "unedited"
CSV_COLUMNS = ("setting", "method", "seed", "metric", "value")
OUTPUT_TRACING = ("ap", "ct", "ap_mlps", "ct_mlps")
# Knowledge-filter inputs: the filter is shared by every cell that agrees on these.
_KNOWLEDGE_DATA_KEYS = (
  "task",
  "sports_source",
  "counterfact_path",
  "counterfact_mc_path",
  "known_threshold",
  "known_measure",
  "known_candidates",
  "max_facts",
)


# ----------------------------------------------------------------------------------
# Configuration.


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


def _digest(record: Any) -> str:
  return hashlib.sha256(json.dumps(io.to_jsonable(record), sort_keys=True).encode()).hexdigest()[:10]


def _setting_key(record: dict[str, Any]) -> dict[str, Any]:
  """What of a setting's config record names its shared outputs: the experiment part
  (not where it ran) without the edit's settings, which none of them depends on (each
  method family has its own tuned edit, and all of them share one knowledge filter,
  evidence and unedited control); the float32 default is left out so that folders
  written before the compute-dtype switch existed keep their names."""
  key = run_lib.experiment_part(record)
  key.pop("edit", None)
  if key.get("compute_dtype") == "float32":
    del key["compute_dtype"]
  return key


def _tiny(spec: ExperimentSpec) -> bool:
  return spec.model.startswith("tiny-")


def shared_outputs(spec: ExperimentSpec, setting: str, workdir: pathlib.Path) -> run_lib.SharedOutputs:
  """Where a cell's shared stage outputs live (see the module docstring)."""
  record = spec.to_json()
  data = record["data"]
  knowledge_key = {
    "model": spec.model,
    "eval_batch_size": spec.eval.batch_size,
    # Random tiny models differ per seed, so their knowledge does too.
    "model_seed": spec.seed if _tiny(spec) else None,
    **{k: data[k] for k in _KNOWLEDGE_DATA_KEYS},
  }
  # Everything but the method and the seed (the seed names the folder).
  setting_record = ExperimentSpec.from_json(
    dict(record, seed=0, localize=dict(record["localize"], method="fact_lookup"))
  )
  root = workdir / "shared" / f"{setting}-{_digest(_setting_key(setting_record.to_json()))}" / f"seed{spec.seed}"
  return run_lib.SharedOutputs(
    knowledge=workdir / "shared" / "knowledge" / f"{spec.data.task}-{_digest(knowledge_key)}.json",
    evidence_dir=root / "evidence",
    unedited_dir=root / "unedited",
  )


# ----------------------------------------------------------------------------------
# Metrics of one cell.


def _measure(task: str, fmt: str) -> tuple[str, str]:
  """(probability field, argmax field) of a format's cells (see the module docstring)."""
  if task == "counterfact" and fmt != "mc":
    return "prob_full", "argmax_full"
  return "prob_normalized", "argmax_candidates"


def _put(out: dict[str, float], name: str, value: Any) -> None:
  if value is not None and isinstance(value, (int, float)) and math.isfinite(value):
    out[name] = float(value)


def _format_cells(out, cells, task, prefix="", suffix="", facts_names=("forget", "forget_heldout")):
  for c in cells:
    kind = "maintain" if c["facts"] == "maintain" else "forget" if c["facts"] in facts_names else None
    if kind is None:
      continue
    role = "edit" if c["answer"] == "edit" else kind
    p_key, a_key = _measure(task, c["format"])
    _put(out, f"{prefix}{role}_{c['format']}{suffix}", c[p_key])
    _put(out, f"{prefix}{role}_{c['format']}{suffix}_argmax", c[a_key])


def robustness_metrics(robust: Mapping[str, Any], task: str) -> dict[str, float]:
  """Relearning, probe, soft-prompt and side-effect metrics of one model's stages."""
  out: dict[str, float] = {}
  for kind in ("lora", "full"):
    res = robust.get(f"relearn_{kind}")
    if not res:
      continue
    for step, ev in sorted(res["curve"].items(), key=lambda kv: int(kv[0])):
      for c in ev["cells"]:
        p_key, a_key = _measure(task, c["format"])
        role = "edit" if c["answer"] == "edit" else "forget"
        fmt = "" if c["format"] == "standard" else f"_{c['format']}"
        _put(out, f"relearn_{kind}_{role}{fmt}_step{int(step)}", c[p_key])
        _put(out, f"relearn_{kind}_{role}{fmt}_step{int(step)}_argmax", c[a_key])
  probes = robust.get("probes")
  if probes:
    for part, prefix in (("retrained", "probe"), ("transfer", "probe_transfer")):
      res = probes.get(part)
      if not res:
        continue
      s = res["summary"]
      for key, name in (("forget_true", "true"), ("forget_edit", "edit"), ("heldout", "heldout")):
        _put(out, f"{prefix}_{name}_mean", s.get(f"{key}_mean"))
        _put(out, f"{prefix}_{name}_max", s.get(f"{key}_max"))
      if part == "retrained":
        for key, name in (("forget_true_accuracy", "true"), ("forget_edit_accuracy", "edit")):
          for layer, v in enumerate(res.get(key) or []):
            _put(out, f"probe_{name}_layer{layer:02d}", v)
    _put(out, "probe_chance", probes.get("chance"))
  for kind in ("prefix", "adapter"):
    res = robust.get(f"softprompt_{kind}")
    if not res:
      continue
    name = f"softprompt_{kind}_forget"
    if task == "counterfact":
      # The summary normalizes over (true, false); CounterFact reports full-vocab p.
      _put(out, name, float(np.mean([r["eval"]["prob_full"] for r in res["runs"]])))
      _put(out, f"softprompt_{kind}_before", res["before_eval"]["prob_full"])
    else:
      _put(out, name, res["summary"]["prob_normalized_mean"])
      _put(out, f"{name}_argmax", res["summary"]["argmax_candidates_mean"])
      _put(out, f"softprompt_{kind}_before", res["before_eval"]["prob_normalized"])
  for key in ("trivia", "mc_benchmark"):
    res = robust.get(key)
    if res:
      _put(out, f"{key}_accuracy", res["prob_normalized"])
      _put(out, f"{key}_accuracy_argmax", res["accuracy"])
  return out


def cell_metrics(results: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
  """(edited metrics, unedited-control metrics) of a run's results dict."""
  task = results["config"]["data"]["task"]
  edited: dict[str, float] = {}
  _format_cells(edited, results["edited"]["cells"], task)
  _put(edited, "retain_kl", results["edited"].get("kl_original_edited"))
  _put(edited, "retain_loss", results["edited"]["retain_text"]["loss"])
  _put(edited, "retain_token_accuracy", results["edited"]["retain_text"]["accuracy"])
  _put(edited, "trained_parameters", results["trained_parameters"])
  if results.get("edit_history"):
    _put(edited, "train_final_loss", results["edit_history"][-1].get("loss"))
  edited.update(robustness_metrics(results.get("robustness", {}).get("edited", {}), task))

  unedited: dict[str, float] = {}
  _format_cells(unedited, results["unedited"]["cells"], task)
  unedited["retain_kl"] = 0.0  # KL of the model to itself
  _put(unedited, "retain_loss", results["unedited"]["retain_text"]["loss"])
  _put(unedited, "retain_token_accuracy", results["unedited"]["retain_text"]["accuracy"])
  unedited["trained_parameters"] = 0.0
  unedited.update(robustness_metrics(results.get("robustness", {}).get("unedited", {}), task))
  return edited, unedited


# ----------------------------------------------------------------------------------
# Intervals.


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean and t-interval of values over seeds (lo/hi are None for one value)."""

  n: int
  mean: float
  lo: float | None
  hi: float | None
  sd: float | None


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
  """mean +- t_{(1+c)/2, n-1} * sd / sqrt(n), sd with ddof=1 (None bounds for n = 1)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  (a jax dependency)

  x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
  if x.size == 0:
    raise ValueError("t_interval needs at least one finite value")
  mean = float(x.mean())
  if x.size == 1:
    return Interval(1, mean, None, None, None)
  sd = float(x.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1)) * sd / math.sqrt(x.size)
  return Interval(int(x.size), mean, mean - half, mean + half, sd)


# ----------------------------------------------------------------------------------
# Rows, aggregation, tables.


@dataclasses.dataclass
class StudyData:
  """Finished cells' values, indexed for tables, claims and figures."""

  config: StudyConfig
  values: dict[tuple[str, str, str], dict[int, float]]  # (setting, method, metric) -> seed -> value
  validity: dict[str, dict[int, dict[str, Any]]]  # setting -> seed -> format validity
  summaries: list[dict[str, Any]]

  def rows(self) -> list[dict[str, Any]]:
    """study.csv rows in report order."""
    out = []
    for s in self.config.settings:
      for method in (UNEDITED,) + self.config.methods:
        metrics = [k[2] for k in self.values if k[0] == s.name and k[1] == method]
        for seed in self.config.seeds:
          for metric in metrics:
            v = self.values[(s.name, method, metric)].get(seed)
            if v is not None:
              out.append({"setting": s.name, "method": method, "seed": seed, "metric": metric, "value": v})
    return out

  def interval(self, setting: str, method: str, metric: str) -> Interval | None:
    by_seed = self.values.get((setting, method, metric))
    return t_interval(list(by_seed.values()), self.config.confidence) if by_seed else None

  def metrics(self, setting: str) -> list[str]:
    seen: dict[str, None] = {}
    for s, _, metric in self.values:
      if s == setting:
        seen[metric] = None
    return list(seen)

  def format_valid(self, setting: str, fmt: str) -> tuple[int, int]:
    """(seeds whose unedited model is above chance in `fmt`, seeds measured)."""
    per_seed = self.validity.get(setting, {})
    flags = [v[fmt]["valid"] for v in per_seed.values() if fmt in v]
    return sum(bool(f) for f in flags), len(flags)


def finished_cells(config: StudyConfig, out_dir: pathlib.Path):
  """(cell, summary path, summary) of every finished cell under `out_dir/cells/`, in run order."""
  for cell in config.cells():
    path = out_dir / "cells" / cell.summary_name
    if path.is_file():
      yield cell, path, io.read_json(path, "study cell summary")


def collect(config: StudyConfig, out_dir: pathlib.Path) -> StudyData:
  """Reads every finished cell's summary under `out_dir/cells/`."""
  values: dict[tuple[str, str, str], dict[int, float]] = {}
  validity: dict[str, dict[int, dict[str, Any]]] = {}
  summaries = []
  for cell, _, summary in finished_cells(config, out_dir):
    summaries.append(summary)
    for metric, v in summary["metrics"].items():
      values.setdefault((cell.setting, cell.method, metric), {})[cell.seed] = v
    # The unedited control is shared by the (setting, seed)'s cells: read it once.
    if cell.seed not in validity.setdefault(cell.setting, {}):
      validity[cell.setting][cell.seed] = summary["format_validity"]
      for metric, v in summary["unedited_metrics"].items():
        values.setdefault((cell.setting, UNEDITED, metric), {})[cell.seed] = v
  return StudyData(config, values, validity, summaries)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
  """study.csv: the long-format rows (integers as integers, floats round-trip exact)."""
  buf = std_io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for r in rows:
    v = r["value"]
    writer.writerow(dict(r, value=int(v) if float(v).is_integer() and abs(v) >= 1 else repr(float(v))))
  return buf.getvalue()


# Metrics that are not probabilities; each is non-negative.
_UNBOUNDED_METRICS = ("trained_parameters", "cell_seconds", "retain_kl", "retain_loss")


def _clipped(iv: Interval, metric: str) -> Interval:
  """The interval cut to the metric's range ([0, 1] for probabilities, >= 0 for the rest).

  With two or three seeds a t-interval is wide (t = 12.7 at n = 2) and runs past a
  probability's bounds; the cut only changes how it reads, not what it includes.
  """
  if iv.lo is None:
    return iv
  hi = iv.hi if metric in _UNBOUNDED_METRICS else min(iv.hi, 1.0)
  return dataclasses.replace(iv, lo=max(iv.lo, 0.0), hi=hi)


def _fmt_interval(iv: Interval | None, metric: str) -> str:
  if iv is None:
    return "-"
  iv = _clipped(iv, metric)
  if metric in ("trained_parameters", "cell_seconds"):
    text = f"{iv.mean:,.0f}"
    return text if iv.lo is None or iv.sd == 0 else f"{text} [{iv.lo:,.0f}, {iv.hi:,.0f}]"
  if metric == "retain_kl":
    text = f"{iv.mean:.4f}"
    return text if iv.lo is None else f"{text} [{iv.lo:.4f}, {iv.hi:.4f}]"
  text = f"{iv.mean:.3f}"
  return f"{text} (n=1)" if iv.lo is None else f"{text} [{iv.lo:.3f}, {iv.hi:.3f}]"


def _formats(data: StudyData, setting: str) -> list[str]:
  """The setting's evaluated formats (standard first), from its cells' configs."""
  for s in data.summaries:
    if s["setting"] == setting:
      formats = list(s["spec"]["eval"]["formats"])
      return (["standard"] if "standard" in formats else []) + [f for f in formats if f != "standard"]
  return []


def _relearn_steps(data: StudyData, setting: str, kind: str) -> list[int]:
  prefix = f"relearn_{kind}_forget_step"
  return sorted(
    {int(m[len(prefix) :]) for m in data.metrics(setting) if m.startswith(prefix) and m[len(prefix) :].isdigit()}
  )


def table_columns(data: StudyData, setting: str) -> list[tuple[str, list[str]]]:
  """The three tables of a setting (the paper's Tables 1-3): (title, metric columns)."""
  present = set(data.metrics(setting))
  formats = _formats(data, setting)
  t1 = ["forget_standard", "edit_standard", "maintain_standard"]
  t1 += [f"{role}_{f}" for f in formats if f != "standard" for role in ("forget", "edit")]
  lora, full = _relearn_steps(data, setting, "lora"), _relearn_steps(data, setting, "full")
  t2 = [f"relearn_lora_forget_step{s}" for s in lora if s > 0]
  t2 += [f"relearn_full_forget_step{full[-1]}"] if full else []
  t2 += ["probe_true_mean", "probe_edit_mean", "softprompt_prefix_forget", "softprompt_adapter_forget"]
  t3 = [f"maintain_{f}" for f in formats if f != "standard"]
  t3 += ["trivia_accuracy", "mc_benchmark_accuracy", "retain_kl", "trained_parameters", MASK_JACCARD, "cell_seconds"]
  tables = [
    ("Table 1: edit and forget accuracy by prompt format", t1),
    ("Table 2: robustness (held-out forget facts after attacks; latent probes)", t2),
    ("Table 3: side effects and cost", t3),
  ]
  return [(title, [c for c in cols if c in present]) for title, cols in tables]


def _column_format(metric: str) -> str | None:
  """The prompt format a forget/edit/maintain metric is measured in."""
  for role in ("forget_", "edit_", "maintain_"):
    if metric.startswith(role):
      return metric[len(role) :].removesuffix("_argmax")
  return None


def setting_markdown(data: StudyData, setting: StudySetting) -> str:
  """Validity, the three tables (mean [t-interval]) and the argmax table of a setting."""
  out = [f"## {setting.name} ({setting.task}, split {setting.split})\n"]
  methods = [
    m for m in (UNEDITED,) + data.config.methods if any(k[0] == setting.name and k[1] == m for k in data.values)
  ]
  if not methods:
    return "\n".join(out + ["No finished cells yet.\n"])
  seeds = sorted({seed for (s, _, _), v in data.values.items() if s == setting.name for seed in v})
  out.append(
    f"Seeds with results: {seeds}. Cells: `mean [{data.config.confidence:.0%} t-interval over seeds]`, cut"
    " to the metric's range ([0, 1] for probabilities); `(n=1)`: one seed, no interval yet.\n"
  )
  formats = _formats(data, setting.name)
  out.append("Format validity (unedited model above chance on maintain facts, Wilson 95% on argmax):\n")
  out.append("| format | valid in seeds | unedited argmax accuracy (mean over seeds) | chance |")
  out.append("|---|---|---|---|")
  invalid = set()
  for f in formats:
    k, n = data.format_valid(setting.name, f)
    if n == 0:
      continue
    per_seed = [v[f] for v in data.validity[setting.name].values() if f in v]
    if k < n:
      invalid.add(f)
    out.append(
      f"| {f} | {k}/{n} | {np.mean([v['argmax_accuracy'] for v in per_seed]):.3f} |"
      f" {np.mean([v['chance'] for v in per_seed]):.3f} |"
    )
  out.append("")
  mark = lambda metric: (
    f"{metric} ✗"
    if _column_format(metric) in invalid
    or any(metric.startswith(f"relearn_{k}_forget_{f}_") for k in ("lora", "full") for f in invalid)
    else metric
  )
  for title, cols in table_columns(data, setting.name):
    if not cols:
      continue
    out.append(f"### {title}\n")
    out.append("| method | " + " | ".join(mark(c) for c in cols) + " |")
    out.append("|---|" + "---|" * len(cols))
    for m in methods:
      out.append(f"| {m} | " + " | ".join(_fmt_interval(data.interval(setting.name, m, c), c) for c in cols) + " |")
    out.append("")
  # Argmax versions of Tables 1 and 2 (Table 3's other-format maintain columns are in study.csv).
  argmax_cols = [
    f"{c}_argmax"
    for _, cols in table_columns(data, setting.name)[:2]
    for c in cols
    if f"{c}_argmax" in set(data.metrics(setting.name))
  ]
  if argmax_cols:
    out.append("### Argmax accuracies (same cells)\n")
    out.append("| method | " + " | ".join(mark(c[: -len("_argmax")]) + " (argmax)" for c in argmax_cols) + " |")
    out.append("|---|" + "---|" * len(argmax_cols))
    for m in methods:
      out.append(
        f"| {m} | " + " | ".join(_fmt_interval(data.interval(setting.name, m, c), c) for c in argmax_cols) + " |"
      )
    out.append("")
  if invalid:
    out.append(
      f"✗ format where the unedited model is at chance in at least one seed ({sorted(invalid)}):"
      " its numbers are reported but no conclusion is drawn from them.\n"
    )
  return "\n".join(out)


# ----------------------------------------------------------------------------------
# The paper's claims, tested with paired differences over seeds.


@dataclasses.dataclass(frozen=True)
class Comparison:
  """fact_lookup minus `other` on `metric`, paired by seed.

  `same_mask_seeds`: the paired seeds in which `other` trained exactly the fact-lookup
  mask. Where that is every paired seed, the two cells differ only in their families'
  tuned edit hyperparameters, so the comparison says nothing about localization and
  is left out of the verdict ("same mask").
  """

  metric: str
  other: str
  interval: Interval
  lower_is_better: bool
  seeds: tuple[int, ...] = ()
  same_mask_seeds: tuple[int, ...] = ()

  @property
  def outcome(self) -> str:
    iv = self.interval
    if self.seeds and set(self.same_mask_seeds) == set(self.seeds):
      return "same mask"
    if iv.lo is None:
      return "untestable"
    better = iv.hi < 0 if self.lower_is_better else iv.lo > 0
    worse = iv.lo > 0 if self.lower_is_better else iv.hi < 0
    return "better" if better else "worse" if worse else "unresolved"

  def text(self) -> str:
    iv = self.interval
    bounds = "" if iv.lo is None else f" [{iv.lo:+.3f}, {iv.hi:+.3f}]"
    bounds += f", seeds {', '.join(map(str, self.seeds))}" if self.seeds else ""
    outcome = self.outcome
    if outcome == "same mask":
      outcome = "same mask as fact_lookup in every seed: compares edit hyperparameters only"
    elif self.same_mask_seeds:
      outcome += f"; same mask as fact_lookup in seed(s) {', '.join(map(str, self.same_mask_seeds))}"
    return f"{self.metric} vs {self.other}: {iv.mean:+.3f}{bounds} ({outcome})"


def _edit_without_seed(summary: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in summary["spec"]["edit"].items() if k != "seed"}


def fact_lookup_values(
  data: StudyData, setting: str, metric: str, other: str, matched: bool = False
) -> dict[int, float]:
  """Seed -> fact lookup's value of `metric`, to pair with `other`'s cells.

  matched=False: the fact-lookup cells (fact lookup's family's tuned edit). matched=True:
  fact lookup's mask trained with `other`'s edit hyperparameters, where the study has
  such a cell: in each seed, a cell that trained exactly the fact-lookup mask with the
  same edit config as `other`'s cell of that seed (a same-mask comparator of that
  family, or the fact-lookup cell itself when the families agree); seeds without one
  are left out.
  """
  if not matched:
    return dict(data.values.get((setting, "fact_lookup", metric), {}))
  cells = {(s["method"], s["seed"]): s for s in data.summaries if s["setting"] == setting}
  candidates = ("fact_lookup",) + tuple(m for m in data.config.methods if m != "fact_lookup")
  same = {m: set(same_mask_seeds(data, setting, m)) for m in candidates}
  out = {}
  for (method, seed), summary in cells.items():
    if method != other:
      continue
    for m in candidates:
      cell = cells.get((m, seed))
      if (
        cell is not None
        and (m == "fact_lookup" or seed in same[m])
        and metric in cell["metrics"]
        and _edit_without_seed(cell) == _edit_without_seed(summary)
      ):
        out[seed] = cell["metrics"][metric]
        break
  return out


def _paired(mine: Mapping[int, float], theirs: Mapping[int, float], confidence: float):
  """(paired seeds, t-interval of mine - theirs over them), or None without a common seed."""
  seeds = tuple(sorted(set(mine) & set(theirs)))
  if not seeds:
    return None
  return seeds, t_interval([mine[s] - theirs[s] for s in seeds], confidence)


def same_mask_seeds(data: StudyData, setting: str, method: str) -> list[int]:
  """Seeds in which `method`'s cell trained exactly the fact-lookup mask (cells
  without a mask record count as different)."""
  return sorted(seed for seed, j in data.values.get((setting, method, MASK_JACCARD), {}).items() if j == 1.0)


def _verdict(comparisons: Sequence[Comparison]) -> str:
  outcomes = [c.outcome for c in comparisons]
  testable = [o for o in outcomes if o not in ("untestable", "same mask")]
  if not testable:
    if outcomes and all(o == "same mask" for o in outcomes):
      return "cannot be tested: every comparator trained the fact-lookup mask itself"
    return "cannot be tested yet (needs at least 2 paired seeds of fact_lookup and a comparator with another mask)"
  same = outcomes.count("same mask")
  left_out = f"; {same} left out: same mask as fact_lookup in every seed" if same else ""
  if "worse" in testable:
    return f"does not hold ({testable.count('worse')} of {len(testable)} comparisons significantly worse{left_out})"
  if all(o == "better" for o in testable):
    return f"holds (all {len(testable)} comparisons significantly better{left_out})"
  return (
    f"not resolved ({testable.count('better')} of {len(testable)} comparisons significantly better,"
    f" the rest within the interval{left_out})"
  )


def _claim_specs(data: StudyData, setting: str) -> list[tuple[str, list[tuple[str, bool]], list[str]]]:
  """A fact-set setting's claims: (claim, [(metric, lower is better)], formats left out
  because the unedited model answers them at chance)."""
  formats = [f for f in _formats(data, setting) if f not in ("standard", "neighborhood")]
  valid = [f for f in formats if (lambda kn: kn[1] > 0 and kn[0] == kn[1])(data.format_valid(setting, f))]
  return [
    (
      "fact-lookup edits generalize to other prompt formats (lower forget p(true))",
      [(f"forget_{f}", True) for f in valid],
      [f for f in formats if f not in valid],
    ),
    (
      "fact-lookup edits resist relearning (lower held-out forget p(true) after the attack)",
      [
        (f"relearn_{k}_forget_step{_relearn_steps(data, setting, k)[-1]}", True)
        for k in ("lora", "full")
        if _relearn_steps(data, setting, k)
      ],
      [],
    ),
    (
      "fact-lookup edits remove latent knowledge (lower probe accuracy vs the true answer)",
      [("probe_true_mean", True)],
      [],
    ),
    (
      "fact-lookup edits have fewer side effects (maintain, retain KL, trivia, neighbors)",
      [("maintain_standard", False), ("retain_kl", True), ("trivia_accuracy", False), ("forget_neighborhood", False)],
      [],
    ),
  ]


def claims(data: StudyData, matched: bool = False) -> list[dict[str, Any]]:
  """The paper's claims per setting: {setting, claim, verdict, details}.

  `matched`: fact lookup's side is its mask trained with each comparator's own edit
  hyperparameters (`fact_lookup_values`), a control for the per-family tuning; the
  default is the paper's protocol (each method with its family's tuned values).

  Fact-set settings (not whole-sport): fact lookup vs each output-tracing method
  (ap, ct, ap_mlps, ct_mlps), difference paired by seed with a t-interval; a claim
  holds when every testable comparison is significantly in the claimed direction
  and fails when one is significantly in the other. Only formats the unedited model
  answers above chance in every seed count, and only comparators whose mask differs
  from fact lookup's in at least one paired seed (`Comparison`). Whole-sport settings: every method's
  LoRA relearning recovers at least half of what the edit removed on the held-out
  half (recovery = (p_last - p_0) / (p_unedited - p_0), a t-interval over seeds).
  """
  out = []
  for setting in data.config.settings:
    task = get_task(setting.task)
    present = set(data.metrics(setting.name))
    if task.whole_set_split(setting.split):
      if not matched:  # whole-sport claims do not compare with fact lookup
        out.append(_whole_set_claim(data, setting, present))
      continue
    others = [m for m in OUTPUT_TRACING if m in data.config.methods]
    same_by_other = {m: set(same_mask_seeds(data, setting.name, m)) for m in others}
    specs = _claim_specs(data, setting.name)
    if not any(k[0] == setting.name for k in data.values):
      out.append(
        {
          "setting": setting.name,
          "claim": "all claims",
          "verdict": "cannot be tested yet (no finished cells)",
          "details": [],
        }
      )
      continue
    for claim, metrics, skipped in specs:
      comps = []
      for metric, lower in metrics:
        if metric not in present:
          continue
        for other in others:
          paired = _paired(
            fact_lookup_values(data, setting.name, metric, other, matched),
            data.values.get((setting.name, other, metric), {}),
            data.config.confidence,
          )
          if paired is not None:
            seeds, iv = paired
            same = tuple(s for s in seeds if s in same_by_other[other])
            comps.append(Comparison(metric, other, iv, lower, seeds, same))
      if comps:
        verdict = _verdict(comps)
      elif skipped and not metrics:
        verdict = "cannot be tested with this model: the unedited model is at chance in every other format"
      else:
        verdict = "cannot be tested yet (no finished fact_lookup and output-tracing cells with these metrics)"
      details = [c.text() for c in comps]
      if skipped:
        details.append(f"not counted (unedited model at chance): {skipped}")
      out.append({"setting": setting.name, "claim": claim, "verdict": verdict, "details": details})
  for item in out:
    item["protocol"] = "matched edit hyperparameters" if matched else "per-family tuned edit hyperparameters"
  return out


def baseline_contrasts(data: StudyData, setting: StudySetting) -> dict[str, Any] | None:
  """Fact lookup minus each baseline (every method but fact lookup and output tracing),
  paired by seed, on the claims' metrics: the paper's comparisons with random, all-MLP
  and nonlocalized edits, reported beside the verdicts (which test output tracing only).

  Returns None for whole-sport settings or without a baseline paired with fact lookup;
  else {"setting", "methods", "rows": [(metric, {method: Interval})]}.
  """
  if get_task(setting.task).whole_set_split(setting.split):
    return None
  methods = [m for m in data.config.methods if m != "fact_lookup" and m not in OUTPUT_TRACING]
  rows, used = [], []
  for _, metrics, _ in _claim_specs(data, setting.name):
    for metric, _ in metrics:
      mine = data.values.get((setting.name, "fact_lookup", metric), {})
      row = {}
      for m in methods:
        paired = _paired(mine, data.values.get((setting.name, m, metric), {}), data.config.confidence)
        if paired is not None:
          row[m] = paired[1]
          used.append(m)
      if row:
        rows.append((metric, row))
  if not rows:
    return None
  return {"setting": setting.name, "methods": [m for m in methods if m in used], "rows": rows}


def baseline_markdown(contrast: Mapping[str, Any]) -> str:
  """`baseline_contrasts` as a table (mean [t-interval], n seeds)."""
  methods = contrast["methods"]
  lines = [
    f"### Fact lookup against the baselines: {contrast['setting']}\n",
    "Fact lookup minus each baseline, paired by seed: mean [t-interval] (n seeds); `*` where the interval"
    " excludes 0. Not part of the verdicts above, which compare with output tracing.\n",
    "| metric | " + " | ".join(methods) + " |",
    "|---|" + "---|" * len(methods),
  ]
  for metric, row in contrast["rows"]:
    cells = []
    for m in methods:
      iv = row.get(m)
      if iv is None:
        cells.append("-")
      elif iv.lo is None:
        cells.append(f"{iv.mean:+.3f} (1)")
      else:
        star = "*" if iv.lo > 0 or iv.hi < 0 else ""
        cells.append(f"{iv.mean:+.3f}{star} [{iv.lo:+.3f}, {iv.hi:+.3f}] ({iv.n})")
    lines.append(f"| {metric} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def same_mask_contrasts(data: StudyData, setting: StudySetting) -> dict[str, Any] | None:
  """Fact lookup against cells that trained exactly its mask: what the families' tuned
  edit hyperparameters alone change.

  In each seed, the cells of other methods whose mask equals that seed's fact-lookup
  mask (`MASK_JACCARD` 1) and whose edit config differs from fact lookup's differ from
  the fact-lookup cell only in their family's edit hyperparameters (same data, same order, same trained weights). Their mean is paired
  with the fact-lookup cell, and the differences get a t-interval over seeds, for the
  metrics of the claims. Returns None for whole-sport settings or when no seed has
  such a cell; else {"setting", "comparators" (seed -> methods), "hyperparameters"
  (key -> [fact lookup's value, the comparators' values]), "rows" [(metric, Interval)]}.
  """
  if get_task(setting.task).whole_set_split(setting.split):
    return None
  cells = {(s["method"], s["seed"]): s for s in data.summaries if s["setting"] == setting.name}
  same = {m: set(same_mask_seeds(data, setting.name, m)) for m in data.config.methods}
  # A same-mask cell with fact lookup's own edit config (its tuning family, or a copy)
  # is fact lookup's cell again: a difference of exactly 0 that says nothing.
  comparators = {
    seed: [
      m
      for m in data.config.methods
      if m != "fact_lookup" and seed in same[m]
      and _edit_without_seed(cells[(m, seed)]) != _edit_without_seed(cells[("fact_lookup", seed)])
    ]
    for seed in sorted(seed for (m, seed) in cells if m == "fact_lookup")
  }
  comparators = {seed: ms for seed, ms in comparators.items() if ms}
  if not comparators:
    return None
  hyper: dict[str, list[Any]] = {}
  for seed, methods in comparators.items():
    mine = _edit_without_seed(cells[("fact_lookup", seed)])
    for m in methods:
      for key, value in _edit_without_seed(cells[(m, seed)]).items():
        if mine.get(key) != value:
          values = hyper.setdefault(key, [mine.get(key)])
          if value not in values[1:]:
            values.append(value)
  present = set(data.metrics(setting.name))
  rows = []
  for _, metrics, _ in _claim_specs(data, setting.name):
    for metric, _ in metrics:
      mine = data.values.get((setting.name, "fact_lookup", metric), {})
      diffs = [
        mine[seed] - float(np.mean([data.values[(setting.name, m, metric)][seed] for m in methods]))
        for seed, methods in comparators.items()
        if seed in mine and all(seed in data.values.get((setting.name, m, metric), {}) for m in methods)
      ]
      if metric in present and diffs:
        rows.append((metric, t_interval(diffs, data.config.confidence)))
  return {"setting": setting.name, "comparators": comparators, "hyperparameters": hyper, "rows": rows}


def same_mask_markdown(contrast: Mapping[str, Any]) -> str:
  """`same_mask_contrasts` as a paragraph and a table."""
  pairs = "; ".join(f"seed {seed}: {', '.join(ms)}" for seed, ms in contrast["comparators"].items())
  hyper = ", ".join(
    f"`{k}` {v[0]} (fact lookup) vs {' / '.join(map(str, v[1:]))}" for k, v in contrast["hyperparameters"].items()
  ) or "none (identical edits)"
  lines = [
    f"### Same mask, other edit hyperparameters: {contrast['setting']}\n",
    f"Cells that trained exactly the fact-lookup mask ({pairs}). They differ from fact lookup's cell"
    f" of the same seed only in their family's tuned edit hyperparameters: {hyper}. Fact lookup minus"
    " them, mean [t-interval over seeds]: a difference here is the hyperparameters' doing, not the"
    " localization's.\n",
    "| metric | fact lookup - same-mask cells | seeds |",
    "|---|---|---|",
  ]
  for metric, iv in contrast["rows"]:
    bounds = "" if iv.lo is None else f" [{iv.lo:+.3f}, {iv.hi:+.3f}]"
    lines.append(f"| {metric} | {iv.mean:+.3f}{bounds} | {iv.n} |")
  return "\n".join(lines) + "\n"


def _whole_set_claim(data: StudyData, setting: StudySetting, present: set[str]) -> dict[str, Any]:
  claim = "whole-sport edits are relearned by every method (LoRA recovers >= half of the edit's drop)"
  steps = _relearn_steps(data, setting.name, "lora")
  if not steps:
    return {
      "setting": setting.name,
      "claim": claim,
      "verdict": "cannot be tested yet (no relearning results)",
      "details": [],
    }
  last = f"relearn_lora_forget_step{steps[-1]}"
  first = f"relearn_lora_forget_step{steps[0]}"
  base = data.values.get((setting.name, UNEDITED, first), {})
  details, outcomes = [], []
  for m in data.config.methods:
    p0, p1 = data.values.get((setting.name, m, first), {}), data.values.get((setting.name, m, last), {})
    ratios = [
      (p1[s] - p0[s]) / (base[s] - p0[s]) for s in sorted(set(p0) & set(p1) & set(base)) if base[s] - p0[s] > 0.05
    ]
    if not ratios:
      if p0:
        details.append(f"{m}: the edit lowered held-out p(true) by <= 0.05: nothing to relearn")
      continue
    iv = t_interval(ratios, data.config.confidence)
    outcome = (
      "untestable"
      if iv.lo is None
      else "relearned"
      if iv.lo > 0.5
      else "not relearned"
      if iv.hi < 0.5
      else "unresolved"
    )
    outcomes.append(outcome)
    bounds = "" if iv.lo is None else f" [{iv.lo:.2f}, {iv.hi:.2f}]"
    details.append(f"{m}: recovery {iv.mean:.2f}{bounds} ({outcome})")
  testable = [o for o in outcomes if o != "untestable"]
  if not testable:
    verdict = "cannot be tested yet (needs at least 2 seeds per method)"
  elif "not relearned" in testable:
    verdict = f"does not hold ({testable.count('not relearned')} method(s) significantly below half recovery)"
  elif all(o == "relearned" for o in testable) and len(testable) == len(data.config.methods):
    verdict = "holds (every method recovers significantly more than half)"
  else:
    verdict = (
      f"not resolved ({testable.count('relearned')} of {len(data.config.methods)} methods significantly relearned)"
    )
  return {"setting": setting.name, "claim": claim, "verdict": verdict, "details": details}


# ----------------------------------------------------------------------------------
# Figures (from the collected values only, so they rebuild from study summaries).


def _series(data: StudyData, setting: str, method: str, metrics: Sequence[str]):
  xs, mean, lo, hi = [], [], [], []
  for i, metric in enumerate(metrics):
    iv = data.interval(setting, method, metric)
    if iv is None:
      continue
    xs.append(i)
    mean.append(iv.mean)
    lo.append(iv.mean if iv.lo is None else iv.lo)
    hi.append(iv.mean if iv.hi is None else iv.hi)
  return xs, mean, lo, hi


def _color(config: StudyConfig, method: str) -> str:
  """One colour per method across every figure (the unedited control in black)."""
  if method == UNEDITED:
    return "black"
  return f"C{config.methods.index(method) % 10}"


def _methods_with(data: StudyData, setting: str, metric: str) -> list[str]:
  return [m for m in (UNEDITED,) + data.config.methods if (setting, m, metric) in data.values]


def plot_relearning(data: StudyData, setting: str, path: pathlib.Path) -> bool:
  """The paper's Figs 2-3: held-out forget p(true) vs attack step, per method."""
  kinds = [k for k in ("lora", "full") if _relearn_steps(data, setting, k)]
  if not kinds:
    return False
  plt = io.pyplot()
  fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), sharey=True, squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    steps = _relearn_steps(data, setting, kind)
    metrics = [f"relearn_{kind}_forget_step{s}" for s in steps]
    for m in _methods_with(data, setting, metrics[0]):
      xs, mean, lo, hi = _series(data, setting, m, metrics)
      x = [steps[i] for i in xs]
      color = _color(data.config, m)
      ax.plot(x, mean, marker="o", ms=3, label=m, color=color, ls="--" if m == UNEDITED else "-")
      ax.fill_between(x, lo, hi, alpha=0.12, color=color, lw=0)
    ax.set_title(f"{setting}: relearning ({kind})", fontsize=9)
    ax.set_xlabel("attack step")
    ax.set_ylim(0, 1)
  axes[0][0].set_ylabel("held-out forget p(true), standard format")
  axes[0][-1].legend(fontsize=7, loc="best")
  io.save_figure(fig, path)
  return True


def plot_probes(data: StudyData, setting: str, path: pathlib.Path) -> bool:
  """The paper's Fig 4: latent-probe accuracy vs the true answer by layer, per method."""
  layers = sorted(
    {int(m[len("probe_true_layer") :]) for m in data.metrics(setting) if m.startswith("probe_true_layer")}
  )
  if not layers:
    return False
  plt = io.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  metrics = [f"probe_true_layer{r:02d}" for r in layers]
  for m in _methods_with(data, setting, metrics[0]):
    xs, mean, lo, hi = _series(data, setting, m, metrics)
    x = [layers[i] for i in xs]
    color = _color(data.config, m)
    ax.plot(x, mean, marker="o", ms=3, label=m, color=color, ls="--" if m == UNEDITED else "-")
    ax.fill_between(x, lo, hi, alpha=0.10, color=color, lw=0)
  chance = data.interval(setting, UNEDITED, "probe_chance")
  if chance is not None:
    ax.axhline(chance.mean, color="gray", lw=1, ls=":")
  ax.set_xlabel("residual stream (0 = embeddings, i = after block i-1)")
  ax.set_ylabel("probe accuracy on forget facts vs true answer")
  ax.set_ylim(0, 1)
  ax.set_title(f"{setting}: latent knowledge by layer", fontsize=9)
  ax.legend(fontsize=7, ncol=2)
  io.save_figure(fig, path)
  return True


def plot_formats_vs_side_effects(data: StudyData, setting: str, path: pathlib.Path) -> bool:
  """Forget p(true) in each non-standard format vs side effects (retain KL, maintain)."""
  formats = [f for f in _formats(data, setting) if f != "standard" and f"forget_{f}" in data.metrics(setting)]
  xs_metrics = [m for m in ("retain_kl", "maintain_standard") if m in data.metrics(setting)]
  if not formats or not xs_metrics:
    return False
  plt = io.pyplot()
  fig, axes = plt.subplots(
    len(xs_metrics), len(formats), figsize=(3.6 * len(formats), 3.2 * len(xs_metrics)), squeeze=False
  )
  for row, xm in enumerate(xs_metrics):
    for col, f in enumerate(formats):
      ax = axes[row][col]
      for m in (UNEDITED,) + data.config.methods:
        ix, iy = data.interval(setting, m, xm), data.interval(setting, m, f"forget_{f}")
        if ix is None or iy is None:
          continue
        err = lambda iv: None if iv.lo is None else [[iv.mean - iv.lo], [iv.hi - iv.mean]]
        ax.errorbar(
          ix.mean,
          iy.mean,
          xerr=err(ix),
          yerr=err(iy),
          fmt="o",
          ms=4,
          capsize=2,
          color=_color(data.config, m),
          label=m if row == col == 0 else None,
        )
        ax.annotate(m, (ix.mean, iy.mean), fontsize=6, xytext=(3, 3), textcoords="offset points")
      k, n = data.format_valid(setting, f)
      ax.set_title(f"{f}" + ("" if n and k == n else " (unedited at chance)"), fontsize=8)
      ax.set_xlabel(xm, fontsize=8)
      ax.set_ylim(0, 1)
      if col == 0:
        ax.set_ylabel("forget p(true)", fontsize=8)
  axes[0][0].legend(fontsize=6, loc="best")
  fig.suptitle(
    f"{setting}: forget p(true) in other formats vs side effects (mean, {data.config.confidence:.0%} t-interval)",
    fontsize=9,
  )
  fig.tight_layout()
  io.save_figure(fig, path)
  return True


# ----------------------------------------------------------------------------------
# The study's outputs.


def study_markdown(data: StudyData, figures: Mapping[str, list[str]], title: str = "Reproduction study") -> str:
  """study.md: per setting the tables, figures and claims; the cells and their cost."""
  cfg = data.config
  total = len(cfg.cells())
  done = len(data.summaries)
  model = data.summaries[0]["spec"]["model"] if data.summaries else cfg.base.get("model", "?")
  out = [
    f"# {title}\n",
    f"Model `{model}`; {done} of {total} cells finished ({len(cfg.settings)} settings x"
    f" {len(cfg.methods)} methods x {len(cfg.seeds)} seeds).\n",
    "Accuracies are probabilities: sports answers normalized over the candidate sports (letter-MC over the"
    " option letters); CounterFact (except letter-MC) the full-vocabulary probability of the first target"
    " token. `_argmax` columns are the matching argmax accuracies (CounterFact: top-1 over the vocabulary)."
    " Forget metrics are on the edited facts (whole-sport settings: the held-out half); relearning, probe and"
    " soft-prompt metrics on the held-out half of the forget set after the attack. `unedited` rows are the"
    " unedited model under the same evaluation and attacks.\n",
  ]
  for setting in cfg.settings:
    out.append(setting_markdown(data, setting))
    for name in figures.get(setting.name, []):
      out.append(f"![{name}](figures/{name})\n")
  out.append("## Claims of the paper\n")
  out.append(claims_markdown(claims(data)))
  out.append("### The same claims at matched edit hyperparameters (a control)\n")
  out.append(
    "Fact lookup's mask trained with each comparator's own edit hyperparameters, taken from the cells"
    " that trained exactly that mask with that config (seeds without one are left out): what the"
    " localization alone does, without the per-family tuning.\n"
  )
  out.append(claims_markdown(claims(data, matched=True)))
  for setting in cfg.settings:
    contrast = same_mask_contrasts(data, setting)
    if contrast is not None:
      out.append(same_mask_markdown(contrast))
    baselines = baseline_contrasts(data, setting)
    if baselines is not None:
      out.append(baseline_markdown(baselines))
  out.append("## Cells\n")
  out.append(
    f"`{MASK_JACCARD}`: the share of the weights trained by the cell or by its seed's fact-lookup mask that"
    " both train (Jaccard index by weight count; 1 = the same mask).\n"
  )
  out.append("| setting | method | seed | mask | trained parameters | units trained | FLU layers | Jaccard with fact lookup | cell seconds |")
  out.append("|---|---|---|---|---|---|---|---|---|")
  for s in data.summaries:
    jaccard = s["metrics"].get(MASK_JACCARD)
    mask = s["mask_name"] + (f" (results of {s['reused_from']}: the same edit)" if "reused_from" in s else "")
    out.append(
      f"| {s['setting']} | {s['method']} | {s['seed']} | {mask} | {s['trained_parameters']:,} |"
      f" {_units_text(s)} | {s['flu_layers']} | {'-' if jaccard is None else f'{jaccard:.3f}'} |"
      f" {s['cell_seconds']:.0f} |"
    )
  out.append(stage_time_markdown(data.summaries))
  return "\n".join(out) + "\n"


def _units_text(summary: Mapping[str, Any], max_listed: int = 6) -> str:
  """A cell's trained units and the matrices outside whole units ("-": not recorded)."""
  if "mask_units" not in summary:
    return "-"
  parts = list(summary["mask_units"]) + list(summary.get("mask_other_matrices", []))
  text = ", ".join(parts[:max_listed])
  return text + (f" (+{len(parts) - max_listed} more)" if len(parts) > max_listed else "")


def stage_time_markdown(summaries: Sequence[Mapping[str, Any]], max_depth: int = 1) -> str:
  """Median seconds per stage over the cells that recorded their stages ("" if none did).

  Depth 0 is a run's own stages (edit, evaluations, the robustness suite per model),
  depth 1 the robustness suite's attacks and evaluations. A stage read back from an
  earlier attempt or shared with another cell takes near zero, so medians, not means.
  """
  timed = [s for s in summaries if s.get("stage_seconds")]
  if not timed:
    return ""
  order: list[tuple[int, str | None, str]] = []
  per_stage: dict[tuple[int, str | None, str], list[float]] = {}
  for s in timed:
    seen: dict[tuple[int, str | None, str], float] = {}
    for entry in s["stage_seconds"]:
      key = (int(entry["depth"]), entry.get("parent"), str(entry["stage"]))
      if key[0] > max_depth:
        continue
      seen[key] = seen.get(key, 0.0) + float(entry["seconds"])
    for key, seconds in seen.items():
      if key not in per_stage:
        order.append(key)
        per_stage[key] = []
      per_stage[key].append(seconds)
  lines = [
    "\n## Where a cell's time goes\n",
    f"Median over the {len(timed)} cells that recorded their stages (a cell's attempts summed; stages"
    " inside the robustness suite indented).\n",
    "| stage | median seconds | cells |",
    "|---|---|---|",
  ]
  for depth, parent, name in order:
    values = per_stage[(depth, parent, name)]
    lines.append(f"| {'&nbsp;' * 4 * depth}{name} | {float(np.median(values)):.1f} | {len(values)} |")
  return "\n".join(lines) + "\n"


def claims_markdown(items: Sequence[Mapping[str, Any]]) -> str:
  """The claims as a verdict table followed by each claim's comparisons."""
  lines = ["| setting | claim | verdict |", "|---|---|---|"]
  for c in items:
    lines.append(f"| {c['setting']} | {c['claim']} | {c['verdict']} |")
  lines.append("")
  for c in items:
    if c["details"]:
      lines.append(f"- {c['setting']}, {c['claim']}:")
      lines.extend(f"  - {d}" for d in c["details"])
  return "\n".join(lines) + "\n"


def write_outputs(config: StudyConfig, out_dir: pathlib.Path) -> StudyData:
  """study.csv, study.md and the figures from the finished cells' summaries."""
  data = collect(config, out_dir)
  io.write_text(out_dir / "study.csv", csv_text(data.rows()))
  figures: dict[str, list[str]] = {}
  for setting in config.settings:
    for kind, plot in (
      ("relearning", plot_relearning),
      ("probes", plot_probes),
      ("formats_vs_side_effects", plot_formats_vs_side_effects),
    ):
      name = f"{setting.name}_{kind}.png"
      if plot(data, setting.name, out_dir / "figures" / name):
        figures.setdefault(setting.name, []).append(name)
  io.write_text(out_dir / "study.md", study_markdown(data, figures))
  io.write_json(out_dir / "claims.json", claims(data) + claims(data, matched=True))
  return data


# ----------------------------------------------------------------------------------
# Running cells.


@dataclasses.dataclass(frozen=True)
class CellOutcome:
  """What happened to a cell in this invocation: "ran", "reused" (a finished cell made
  the same edit: `find_twin`), "skipped" (finished before) or "failed"."""

  cell: Cell
  status: str
  seconds: float = 0.0
  error: str = ""


MASK_JACCARD = "mask_jaccard_fact_lookup"


def mask_record(
  mask: masks_lib.ParamMask, flu_layers: Sequence[int], model: Any, source: str = "cell"
) -> dict[str, Any]:
  """What a cell trained, and how much of it is the fact-lookup mask of its seed.

  {"units": whole units trained, "other_matrices": matrices trained outside them,
  "jaccard": |M & F| / |M | F| by weight count with F the MLPs at `flu_layers`,
  "source": "cell" (the mask file of the cell's own run) or "rebuilt" (its localization
  stage rerun on the kept evidence, `backfill_mask_records`)}. Two methods whose masks
  are equal (Jaccard 1) make the same edit up to their families' tuned hyperparameters,
  so a difference between their cells says nothing about localization (`claims`).
  """
  flu = baselines_lib.flu_mlps(model, flu_layers).mask
  coincidence = masks_lib.mask_coincidence({"cell": mask, "fact_lookup": flu}, model)
  units = masks_lib.mask_units(mask, model)
  in_units = {label for u in units for label in u.labels}
  other = []
  for label in masks_lib.trained_labels(mask):
    if label not in in_units:
      layer, matrix = masks_lib.parse_matrix_label(label)
      kind = "attn" if matrix in masks_lib.ATTENTION_MATRICES else "mlp"
      # A sub-tensor entry (heads, neurons) is marked as partial.
      whole = not isinstance(mask[label], np.ndarray) or bool(mask[label].all())
      other.append(f"{kind}{layer}.{matrix}" + ("" if whole else " (part)"))
  return {
    "units": [str(u) for u in units], "other_matrices": other, "jaccard": coincidence["jaccard"][0][1], "source": source,
  }


def _summary(
  cell: Cell, spec: ExperimentSpec, results: Mapping[str, Any], seconds: float, attempts: Sequence[float],
  stage_seconds: Sequence[Mapping[str, Any]], mask: Mapping[str, Any],
) -> dict[str, Any]:
  edited, unedited = cell_metrics(results)
  edited["cell_seconds"] = seconds
  edited[MASK_JACCARD] = mask["jaccard"]
  loc = results["localization"]
  return {
    "setting": cell.setting,
    "method": cell.method,
    "seed": cell.seed,
    "mask_name": loc["mask_name"],
    "flu_layers": loc.get("flu_layers"),
    "mask_units": mask["units"],
    "mask_other_matrices": mask["other_matrices"],
    "mask_record_source": mask["source"],
    "trained_parameters": int(results["trained_parameters"]),
    "cell_seconds": seconds,
    "attempt_seconds": list(attempts),
    # Every attempt's stages (`progress.timing_log`, with an "attempt" index): where
    # the cell's time went, a killed attempt's work included.
    "stage_seconds": [dict(entry) for entry in stage_seconds],
    "split": results["split"],
    "format_validity": results["format_validity"],
    "metrics": edited,
    "unedited_metrics": unedited,
    "spec": spec.to_json(),
  }


def _spec_record(spec: ExperimentSpec) -> dict[str, Any]:
  """`spec.to_json()` as it reads back from a summary file (tuples as lists)."""
  return json.loads(json.dumps(spec.to_json()))


def _check_recorded_spec(path: pathlib.Path, summary: Mapping[str, Any], spec: ExperimentSpec) -> None:
  recorded = summary.get("spec")
  current = _spec_record(spec)
  if recorded != current:
    changed = schema.diff(recorded or {}, current)
    raise ValueError(
      f"{path}: this finished cell was run with another config ({'; '.join(changed[:6])}); use another"
      " --workdir and results folder for a different study, or remove the cell's summary to rerun it"
    )


class _Models:
  """Loads each model once (tiny presets once per seed: their weights are seeded)."""

  def __init__(self, loader: Callable[[str, int], tuple[Any, Any]] | None = None):
    from mech_unlearn_jax.models import loaders  # pylint: disable=g-import-not-at-top

    self._loader = loader or loaders.load_model_and_tokenizer
    self._cache: dict[tuple[str, int | None], tuple[Any, Any]] = {}

  def get(self, spec: ExperimentSpec) -> tuple[Any, Any]:
    key = (spec.model, spec.seed if _tiny(spec) else None)
    if key not in self._cache:
      if not _tiny(spec):
        self._cache.clear()  # one real model in memory at a time
      with progress.stage("study: load model") as info:
        self._cache[key] = self._loader(spec.model, spec.seed)
        info["detail"] = spec.model
    return self._cache[key]


def run_cell(
  config: StudyConfig, cell: Cell, workdir: pathlib.Path, out_dir: pathlib.Path, models: _Models
) -> CellOutcome:
  """Runs (or resumes, or skips) one cell and writes its summary under `out_dir/cells/`."""
  spec = config.cell_spec(cell)
  summary_path = out_dir / "cells" / cell.summary_name
  if summary_path.is_file():
    _check_recorded_spec(summary_path, io.read_json(summary_path, "study cell summary"), spec)
    return CellOutcome(cell, "skipped")
  cell_dir = workdir / "cells" / cell.setting / cell.method / f"seed{cell.seed}"
  timing_path = cell_dir / "study_timing.json"
  recorded = cell_dir / "study_cell.json"
  if recorded.is_file():  # finished in this workdir; the results folder is new
    summary = io.read_json(recorded, "study cell summary")
    _check_recorded_spec(recorded, summary, spec)
    io.write_json(summary_path, summary)
    return CellOutcome(cell, "skipped")
  timing = io.read_json(timing_path, "cell timing") if timing_path.is_file() else {}
  attempts, stages = list(timing.get("attempts", [])), list(timing.get("stages", []))

  def record_attempt(stage_seconds) -> None:
    # A failed or interrupted attempt counts toward the cell's cost too.
    stages.extend(dict(e, attempt=len(attempts)) for e in stage_seconds)
    attempts.append(time.time() - started)
    io.write_json(timing_path, {"attempts": attempts, "stages": stages})

  started = time.time()
  twin = None
  try:
    with progress.timing_log() as stage_seconds:
      # The twin check runs the cell's localization stage (for a seed's first cell it
      # computes the shared evidence, which run_experiment then reads back), so it is
      # part of the attempt and of the cell's recorded time. An interrupted attempt of
      # the cell's own does not change its edit, so it is checked on resumes too.
      if config.reuse_identical_edits:
        loc, record = cell_mask(cell, spec, workdir, models)
        twin = find_twin(config, cell, spec, loc["flu_layers"], record, out_dir)
      if twin is None:
        results = run_lib.run_experiment(
          spec, cell_dir, shared=shared_outputs(spec, cell.setting, workdir), loaded=models.get(spec)
        )
  except BaseException:
    record_attempt(stage_seconds)
    raise
  finally:
    # Cells compile for their own masks; without a release a long study passes the
    # per-process memory-mapping limit and crashes. Traces stay: the next cell's
    # attacks and scorers have the same structure (and under the "auto" policy their
    # executables too, until the process is crowded).
    compile_cache.release_at_boundary()
  record_attempt(stage_seconds)
  seconds = float(sum(attempts))
  if twin is not None:
    summary = dict(
      twin, method=cell.method, mask_name=loc["mask_name"], reused_from=twin["method"], cell_seconds=seconds,
      mask_units=record["units"], mask_other_matrices=record["other_matrices"], mask_record_source=record["source"],
      attempt_seconds=attempts, stage_seconds=stages, spec=_spec_record(spec),
      metrics=dict(twin["metrics"], cell_seconds=seconds),
    )
    io.write_json(recorded, summary)
    io.write_json(summary_path, summary)
    progress.stage_line("cell reused", seconds, f"{cell.label}: the same edit as {twin['method']} (same mask and config)")
    return CellOutcome(cell, "reused", seconds=seconds)
  model = models.get(spec)[0]
  mask, _ = masks_lib.load_mask(cell_dir / "localization" / "mask.npz", model)
  record = mask_record(mask, results["localization"]["flu_layers"], model, source="cell")
  summary = _summary(cell, spec, results, seconds, attempts, stages, record)
  io.write_json(recorded, summary)
  io.write_json(summary_path, summary)
  return CellOutcome(cell, "ran", seconds=summary["cell_seconds"])


# Shared stage outputs small enough to keep with the results (JSON records, cached
# score arrays; not the evidence plots): a new checkout of the results folder then
# resumes without recomputing the knowledge filter, the localization evidence and the
# unedited control (1,885 s for seed 1 of sports_random16 on a 2-core CPU).
_KEPT_SHARED_SUFFIXES = (".json", ".npz")
_KEPT_SHARED_MAX_BYTES = 4 << 20


def sync_shared(src: str | os.PathLike, dst: str | os.PathLike) -> int:
  """Copies every kept shared output under `src` that `dst` lacks (atomically, so a
  killed copy leaves no half-written file); returns how many were copied. Names carry
  the settings' config hashes, so a copied file is only ever read by the same config."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if not src.is_dir():
    return 0
  copied = 0
  for path in sorted(src.rglob("*")):
    if not path.is_file() or path.suffix not in _KEPT_SHARED_SUFFIXES or path.name.startswith("."):
      continue
    if path.stat().st_size > _KEPT_SHARED_MAX_BYTES:
      continue
    target = dst / path.relative_to(src)
    if not target.exists():
      io.write_bytes(target, path.read_bytes())
      copied += 1
  return copied


def cell_mask(
  cell: Cell, spec: ExperimentSpec, workdir: pathlib.Path, models: _Models, source: str = "cell"
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(localization summary, `mask_record`) of a cell, from its own localization stage run
  in `workdir/mask_records/` on the shared evidence (seconds once the evidence exists:
  scores and the fact-lookup pick are read back, seeded baselines redraw the same
  matrices; the first cell of a seed computes the evidence here). `source` names it in
  the record: "cell" for the cell's own attempt, "rebuilt" for a finished one's."""
  model, tokenizer = models.get(spec)
  loaded = (run_lib.place_model(model, spec.mesh), tokenizer)  # where run_experiment localizes
  scratch = workdir / "mask_records" / cell.setting / cell.method / f"seed{cell.seed}"
  with progress.stage("cell mask", release_compiled=True) as info:  # one name: one row of the time table
    info["detail"] = cell.label
    loc = run_lib.localize_only(
      spec, [cell.method], scratch, shared=shared_outputs(spec, cell.setting, workdir), loaded=loaded
    )[cell.method]
  mask, _ = masks_lib.load_mask(scratch / "localization" / cell.method / "mask.npz", model)
  return loc, mask_record(mask, loc["flu_layers"], model, source=source)


def _experiment_but_method(record: Mapping[str, Any]) -> dict[str, Any]:
  """The experiment part of a config record (`run_lib.experiment_part`: not where it
  ran) without the method's name."""
  out = run_lib.experiment_part(dict(record))
  out["localize"] = dict(out["localize"], method=None)
  return out


def find_twin(
  config: StudyConfig, cell: Cell, spec: ExperimentSpec, flu_layers: Any, record: Mapping[str, Any],
  out_dir: pathlib.Path,
) -> dict[str, Any] | None:
  """A finished cell that made exactly `cell`'s edit, or None.

  Its twin has the same setting and seed, the same experiment but for the method's
  name (so the same edit hyperparameters: the same tuning family), the same FLU
  layers and the same whole matrices trained. Everything after localization (edit
  data and order, attacks, probes) depends on these alone, so its results are this
  cell's. A cell that itself reused another is never a twin (its original is), nor
  is a mask with sub-tensor entries. A twin's record may be "rebuilt" (its localization
  rerun on the stored scores and picks it was made from, matching its recorded size).
  """
  if any(m.endswith("(part)") for m in record["other_matrices"]):
    return None
  mine = _experiment_but_method(_spec_record(spec))
  for other, _, summary in finished_cells(config, out_dir):
    if (other.setting, other.seed) != (cell.setting, cell.seed) or other.method == cell.method:
      continue
    if "reused_from" in summary or "mask_units" not in summary:
      continue
    same_mask = (summary["mask_units"], summary["mask_other_matrices"], summary["flu_layers"]) == (
      record["units"], record["other_matrices"], flu_layers
    )
    if same_mask and _experiment_but_method(summary["spec"]) == mine:
      return summary
  return None


def backfill_mask_records(
  config: StudyConfig, workdir: pathlib.Path, out_dir: pathlib.Path, models: _Models
) -> list[str]:
  """Adds the mask record (`mask_record`) to finished cells summarized before it existed.

  From the cell's own `localization/mask.npz` where its run folder is still in
  `workdir`; otherwise its localization stage is rerun on the kept shared evidence
  (`cell_mask`: the stored scores and fact-lookup pick are read back, seeded baselines
  redraw the same matrices) and the record says "rebuilt". A rebuilt mask whose size or
  FLU layers differ from what the cell recorded, or a cell that cannot be rebuilt, is
  reported and left without a record, never stops the study. Returns the labels of the
  cells it completed.
  """
  done = []
  for cell, path, summary in finished_cells(config, out_dir):
    if "mask_units" in summary:
      continue
    cell_dir = workdir / "cells" / cell.setting / cell.method / f"seed{cell.seed}"
    try:
      spec = config.cell_spec(cell)
      _check_recorded_spec(path, summary, spec)
      own = cell_dir / "localization" / "mask.npz"
      if own.is_file():
        model = models.get(spec)[0]
        mask, _ = masks_lib.load_mask(own, model)
        flu_layers = summary["flu_layers"]
        record = mask_record(mask, flu_layers, model, source="cell")
        trained = masks_lib.trained_parameter_count(mask, model)
      else:
        loc, record = cell_mask(cell, spec, workdir, models, source="rebuilt")
        flu_layers, trained = loc["flu_layers"], loc["trained_parameters"]
    except Exception as e:  # pylint: disable=broad-except
      progress.stage_line("mask record skipped", 0.0, f"{cell.label}: {type(e).__name__}: {e}")
      continue
    if trained != summary["trained_parameters"] or flu_layers != summary["flu_layers"]:
      progress.stage_line(
        "mask record skipped", 0.0,
        f"{cell.label}: the mask trains {trained:,} weights (FLU layers {flu_layers}), the cell recorded"
        f" {summary['trained_parameters']:,} ({summary['flu_layers']})",
      )
      continue
    summary = dict(
      summary, mask_units=record["units"], mask_other_matrices=record["other_matrices"],
      mask_record_source=record["source"],
    )
    summary["metrics"] = dict(summary["metrics"], **{MASK_JACCARD: record["jaccard"]})
    if (cell_dir / "study_cell.json").is_file():
      io.write_json(cell_dir / "study_cell.json", summary)
    io.write_json(path, summary)
    done.append(cell.label)
  return done


def run_study(
  config: StudyConfig,
  workdir: str | pathlib.Path,
  out_dir: str | pathlib.Path | None = None,
  *,
  only_settings: Sequence[str] = (),
  only_methods: Sequence[str] = (),
  only_seeds: Sequence[int] = (),
  max_cells: int = 0,
  keep_going: bool = False,
  on_cell_done: Callable[[CellOutcome, StudyData], None] | None = None,
  loader: Callable[[str, int], tuple[Any, Any]] | None = None,
) -> list[CellOutcome]:
  """Runs the study's cells in order (see the module docstring); returns what happened.

  Args:
    config: the study.
    workdir: runs and shared stage outputs.
    out_dir: study.csv, study.md, figures and cell summaries (default workdir/results).
    only_settings, only_methods, only_seeds: run a subset (the report covers every
      finished cell of the study).
    max_cells: stop after running this many cells (0: no limit; skipped finished
      cells and cells that took a twin's results do not count).
    keep_going: record a failing cell in `out_dir/failures.json` and go on
      (default: stop at the first failure).
    on_cell_done: called after each cell that ran or took a twin's results, once the
      outputs are rewritten (e.g. a launcher committing the results folder).
    loader: (model spec, seed) -> (model, tokenizer) (default: the library's loader).
  """
  workdir = pathlib.Path(workdir)
  out_dir = workdir / "results" if out_dir is None else pathlib.Path(out_dir)
  cells = config.cells(only_settings, only_methods, only_seeds)
  models = _Models(loader)
  outcomes: list[CellOutcome] = []
  failures_path = out_dir / "failures.json"
  failures = io.read_json(failures_path, "study failures") if failures_path.is_file() else {}
  with run_lib.workdir_lock(workdir):
    io.write_json(workdir / "study.json", config.to_json())
    sync_shared(out_dir / "shared", workdir / "shared")
    if backfill_mask_records(config, workdir, out_dir, models):
      write_outputs(config, out_dir)
    ran = 0
    for i, cell in enumerate(cells):
      if max_cells and ran >= max_cells:
        break
      try:
        with progress.stage(f"cell {i + 1}/{len(cells)}") as info:
          outcome = run_cell(config, cell, workdir, out_dir, models)
          info["detail"] = f"{cell.label}: {outcome.status}"
      except Exception as e:  # pylint: disable=broad-except
        if not keep_going:
          raise
        outcome = CellOutcome(cell, "failed", error=f"{type(e).__name__}: {e}")
        failures[cell.label] = outcome.error
        io.write_json(failures_path, failures)
        progress.stage_line("cell failed", 0.0, f"{cell.label}: {outcome.error}")
      outcomes.append(outcome)
      if outcome.status != "skipped":
        sync_shared(workdir / "shared", out_dir / "shared")
      if outcome.status in ("ran", "reused"):
        ran += outcome.status == "ran"
        failures.pop(cell.label, None)
        if failures_path.is_file():
          io.write_json(failures_path, failures)
        data = write_outputs(config, out_dir)
        if on_cell_done is not None:
          on_cell_done(outcome, data)
    write_outputs(config, out_dir)
  return outcomes
