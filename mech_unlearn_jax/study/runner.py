"""Running a study: each cell is one main-job run; shared stage outputs, twins,
mask records and resuming (see the package docstring for the workdir layout)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mech_unlearn_jax import compile_cache
from mech_unlearn_jax import io
from mech_unlearn_jax import progress
from mech_unlearn_jax.experiment import run as run_lib
from mech_unlearn_jax.experiment import schema
from mech_unlearn_jax.experiment.spec import ExperimentSpec
from mech_unlearn_jax.localize import baselines as baselines_lib
from mech_unlearn_jax.localize import masks as masks_lib
from mech_unlearn_jax.study.config import CELL_SUMMARY_FILE, CELL_TIMING_FILE, FAILURES_FILE, Cell, StudyConfig
from mech_unlearn_jax.study import plan as plan_lib
from mech_unlearn_jax.study.metrics import MASK_JACCARD, cell_metrics
from mech_unlearn_jax.study.aggregate import StudyData, finished_cells
from mech_unlearn_jax.study.report import write_outputs


def shared_outputs(spec: ExperimentSpec, setting: str, workdir: pathlib.Path) -> run_lib.SharedOutputs:
  """Where a cell's shared stage outputs live: `workdir/shared`, keyed as
  `run_lib.keyed_shared_outputs` says (see the package docstring)."""
  return run_lib.keyed_shared_outputs(spec, workdir / "shared", setting)


@dataclasses.dataclass(frozen=True)
class CellOutcome:
  """What happened to a cell in this invocation: "ran", "reused" (a finished cell made
  the same edit: `find_twin`), "skipped" (finished before) or "failed"."""

  cell: Cell
  status: str
  seconds: float = 0.0
  error: str = ""


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
    key = (spec.model, spec.seed if run_lib.is_tiny(spec) else None)
    if key not in self._cache:
      if not run_lib.is_tiny(spec):
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
  cell_dir = cell.run_dir(workdir)
  timing_path = cell_dir / CELL_TIMING_FILE
  recorded = cell_dir / CELL_SUMMARY_FILE
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
  """Copies every kept shared output under `src` that `dst` lacks, or holds in an
  older, different version (atomically, so a killed copy leaves no half-written file);
  returns how many were copied. Names carry the settings' config hashes, so a copied
  file is only ever read by the same config. A shared output is rewritten only when a
  stage upgrades an output recorded by older code (e.g. evaluation cells without fact
  counts); the newer file wins, so the upgrade reaches the results folder and a later
  workdir restored from it does not redo it."""
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
    # Read contents only for an existing, older target (the rare upgrade case).
    if target.exists() and (target.stat().st_mtime >= path.stat().st_mtime or target.read_bytes() == path.read_bytes()):
      continue
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
    cell_dir = cell.run_dir(workdir)
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
    if (cell_dir / CELL_SUMMARY_FILE).is_file():
      io.write_json(cell_dir / CELL_SUMMARY_FILE, summary)
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
  finish_by: float | None = None,
  keep_going: bool = False,
  on_cell_done: Callable[[CellOutcome, StudyData], None] | None = None,
  loader: Callable[[str, int], tuple[Any, Any]] | None = None,
) -> list[CellOutcome]:
  """Runs the study's cells in order (see the package docstring); returns what happened.

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
  failures_path = out_dir / FAILURES_FILE
  failures = io.read_json(failures_path, "study failures") if failures_path.is_file() else {}
  with run_lib.workdir_lock(workdir):
    io.write_json(workdir / "study.json", config.to_json())
    sync_shared(out_dir / "shared", workdir / "shared")
    if backfill_mask_records(config, workdir, out_dir, models):
      write_outputs(config, out_dir)
    ran = 0
    # The whole study's states set the pace; they change only when a cell runs, so
    # they are read again after one did, not before every (mostly finished) cell.
    states = None
    for i, cell in enumerate(cells):
      if max_cells and ran >= max_cells:
        break
      if finish_by is not None:
        states = states or plan_lib.cell_states(config, workdir, out_dir)
        reason = plan_lib.past_deadline(states, cell, time.time(), finish_by)
        if reason:
          progress.stage_line("study stopped", 0.0, reason)
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
        states = None
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
