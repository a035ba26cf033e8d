"""Finished cells read back as values per (setting, method, metric, seed), with
t-intervals over seeds; `study.csv` in long format."""

from __future__ import annotations

import csv
import dataclasses
import io as std_io
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mech_unlearn_jax import io
from mech_unlearn_jax.study.config import StudyConfig, UNEDITED


CSV_COLUMNS = ("setting", "method", "seed", "metric", "value")


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


def paired_interval(mine: Mapping[int, float], theirs: Mapping[int, float], confidence: float):
  """(paired seeds, t-interval of mine - theirs over them), or None without a common seed."""
  seeds = tuple(sorted(set(mine) & set(theirs)))
  if not seeds:
    return None
  return seeds, t_interval([mine[s] - theirs[s] for s in seeds], confidence)


def excludes_zero(iv: Interval) -> bool:
  """Whether a difference's interval lies on one side of 0 (False for one value)."""
  return iv.lo is not None and (iv.lo > 0 or iv.hi < 0)


def signed_interval(iv: Interval, digits: int = 3) -> str:
  """A difference as "+0.060 [+0.040, +0.080]" ("+0.060" for one value)."""
  text = f"{iv.mean:+.{digits}f}"
  return text if iv.lo is None else f"{text} [{iv.lo:+.{digits}f}, {iv.hi:+.{digits}f}]"


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

  def valid_in_every_seed(self, setting: str, fmt: str) -> bool:
    """Measured in some seed and above chance in every seed measured (claims use only these)."""
    k, n = self.format_valid(setting, fmt)
    return n > 0 and k == n


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


def clipped_to_range(iv: Interval, metric: str) -> Interval:
  """The interval cut to the metric's range ([0, 1] for probabilities, >= 0 for the rest).

  With two or three seeds a t-interval is wide (t = 12.7 at n = 2) and runs past a
  probability's bounds; the cut only changes how it reads, not what it includes. Tables
  and figures both show intervals through it.
  """
  if iv.lo is None:
    return iv
  hi = iv.hi if metric in _UNBOUNDED_METRICS else min(iv.hi, 1.0)
  return dataclasses.replace(iv, lo=max(iv.lo, 0.0), hi=hi)


def _fmt_interval(iv: Interval | None, metric: str) -> str:
  if iv is None:
    return "-"
  iv = clipped_to_range(iv, metric)
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


# Formats whose "forget" prompts are about *other* subjects (CounterFact neighborhood:
# other subjects that share the forget fact's true object): their p(true) should stay
# high, a side effect of the edit, not a measure of forgetting.
SIDE_EFFECT_FORMATS = ("neighborhood",)


def _forget_formats(data: StudyData, setting: str) -> list[str]:
  """The setting's formats that measure the edited facts themselves (standard first)."""
  return [f for f in _formats(data, setting) if f not in SIDE_EFFECT_FORMATS]


def _relearn_steps(data: StudyData, setting: str, kind: str) -> list[int]:
  prefix = f"relearn_{kind}_forget_step"
  return sorted(
    {int(m[len(prefix) :]) for m in data.metrics(setting) if m.startswith(prefix) and m[len(prefix) :].isdigit()}
  )
