"""Finished main-job runs compared in groups: each metric's mean and t-interval over a
group's seeds, and each group's difference from the first group, paired by seed.

A group is a set of workdirs of `launch.run` that differ only in their seed (say, one
edit budget at seeds 0-2); the groups differ in what is being compared. The metrics are
a study cell's (`metrics.cell_metrics`): the edited model's accuracies per format, retain
KL and loss, and the attacks' numbers where the runs had robustness stages.

  python -m launch.compare_runs --group=default:runs/a0,runs/a1,runs/a2 \
      --group=reference:runs/b0,runs/b1,runs/b2
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence

from mech_unlearn_jax import io
from mech_unlearn_jax.experiment.layout import RunLayout
from mech_unlearn_jax.study.aggregate import (
    Interval,
    _fmt_interval,
    excludes_zero,
    paired_interval,
    signed_interval,
    t_interval,
)
from mech_unlearn_jax.study.metrics import cell_metrics

# Metrics left out unless asked for: they describe the run, not the edit.
_RUN_METRICS = ("trained_parameters", "train_final_loss")


@dataclasses.dataclass(frozen=True)
class GroupValues:
  """One group's runs: seed -> metric -> value, and where each seed's run is."""

  name: str
  values: dict[int, dict[str, float]]
  workdirs: dict[int, str]


def read_group(name: str, workdirs: Sequence[str | pathlib.Path]) -> GroupValues:
  """Reads each workdir's results.json (a finished `launch.run`), keyed by its seed."""
  if not workdirs:
    raise ValueError(f"group {name!r}: no workdirs")
  values: dict[int, dict[str, float]] = {}
  where: dict[int, str] = {}
  for workdir in workdirs:
    path = RunLayout(workdir).results_json
    if not path.is_file():
      raise FileNotFoundError(f"group {name!r}: {path} not found (is {workdir} a finished run's workdir?)")
    results = io.read_json(path, "run results")
    seed = int(results["config"]["seed"])
    if seed in values:
      raise ValueError(f"group {name!r}: {where[seed]} and {workdir} both ran seed {seed}; a group pairs by seed")
    values[seed], _ = cell_metrics(results)
    where[seed] = str(workdir)
  return GroupValues(name, values, where)


def parse_group(text: str) -> tuple[str, list[str]]:
  """'name:dir,dir,...' -> (name, dirs)."""
  name, sep, dirs = text.partition(":")
  parts = [d.strip() for d in dirs.split(",") if d.strip()]
  if not sep or not name.strip() or not parts:
    raise ValueError(f"--group={text!r}: expected NAME:WORKDIR[,WORKDIR...]")
  return name.strip(), parts


def common_metrics(groups: Sequence[GroupValues], with_argmax: bool = False) -> list[str]:
  """Metrics every run of every group has, in the first run's order."""
  runs = [v for g in groups for v in g.values.values()]
  shared = set.intersection(*(set(r) for r in runs))
  return [
    m for m in runs[0]
    if m in shared and m not in _RUN_METRICS and (with_argmax or not m.endswith("_argmax"))
  ]


@dataclasses.dataclass(frozen=True)
class MetricRow:
  metric: str
  per_group: tuple[Interval, ...]
  # Group i (i >= 1) minus the first group over their common seeds: (seeds, interval).
  differences: tuple[tuple[tuple[int, ...], Interval] | None, ...]


def compare(groups: Sequence[GroupValues], metrics: Sequence[str], confidence: float = 0.95) -> list[MetricRow]:
  """Per metric: each group's t-interval over seeds and its paired difference from the first."""
  if len(groups) < 1:
    raise ValueError("compare needs at least one group")
  rows = []
  for metric in metrics:
    by_seed = [{s: v[metric] for s, v in g.values.items() if metric in v} for g in groups]
    missing = [g.name for g, b in zip(groups, by_seed) if not b]
    if missing:
      raise KeyError(f"metric {metric!r}: no run of group(s) {missing} has it")
    rows.append(
      MetricRow(
        metric,
        tuple(t_interval(list(b.values()), confidence) for b in by_seed),
        tuple(paired_interval(b, by_seed[0], confidence) for b in by_seed[1:]),
      )
    )
  return rows


def _fmt_difference(diff, metric: str) -> str:
  if diff is None:
    return "no common seed"
  seeds, iv = diff
  if iv.lo is None:
    return f"{iv.mean:+.3f} (seed {seeds[0]} only)"
  return signed_interval(iv, 4 if metric == "retain_kl" else 3) + (" *" if excludes_zero(iv) else "")


def markdown(groups: Sequence[GroupValues], rows: Sequence[MetricRow], confidence: float = 0.95) -> str:
  """A table: metric, each group's mean [interval] (n), each later group minus the first."""
  first = groups[0].name
  head = ["metric"] + [f"{g.name} (seeds {', '.join(map(str, sorted(g.values)))})" for g in groups]
  head += [f"{g.name} - {first}, paired" for g in groups[1:]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r.metric] + [_fmt_interval(iv, r.metric) for iv in r.per_group]
    cells += [_fmt_difference(d, r.metric) for d in r.differences]
    lines.append("| " + " | ".join(cells) + " |")
  pct = f"{confidence:.0%}"
  lines.append(
    f"\nMean and {pct} t-interval over each group's seeds; differences are paired by seed"
    f" ({pct} t-interval of the per-seed differences; * where it excludes 0)."
  )
  return "\n".join(lines) + "\n"


def compare_runs(
  group_dirs: Mapping[str, Sequence[str | pathlib.Path]] | Sequence[tuple[str, Sequence[str | pathlib.Path]]],
  metrics: Sequence[str] = (),
  with_argmax: bool = False,
  confidence: float = 0.95,
) -> str:
  """Reads the groups' runs and returns the markdown table (`markdown`)."""
  items = list(group_dirs.items()) if isinstance(group_dirs, Mapping) else list(group_dirs)
  names = [n for n, _ in items]
  if len(set(names)) != len(names):
    raise ValueError(f"group names must be distinct, got {names}")
  groups = [read_group(n, dirs) for n, dirs in items]
  wanted = list(metrics) or common_metrics(groups, with_argmax)
  return markdown(groups, compare(groups, wanted, confidence), confidence)
