"""Where a study stands, without running anything: every cell done, reused, started,
failed or pending, and the time left at the finished cells' pace.

`python -m launch.study --plan` prints `plan_markdown`; a study that spans many
sessions (a reference-budget cell takes 25-46 minutes on a 2-core CPU) says here which
cells remain and where a started one will resume. Reads only files: the results
folder's cell summaries and `failures.json`, and each started cell's run folder (its
`study_timing.json`, edit checkpoints and stage outputs).

The pace leaves out the unedited control (the unedited model's evaluation and
robustness suite, about 11 minutes at the reference budget): the first cell of a
setting and seed computes it and the others read it, so a cell is paced at the median
cell without it, plus the longest control so far where its seed has no finished cell
yet.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time
from collections.abc import Sequence

from mech_unlearn_jax import io
from mech_unlearn_jax.experiment.layout import RunLayout
from mech_unlearn_jax.experiment.run import UNEDITED_CONTROL_STAGES
from mech_unlearn_jax.study.config import CELL_SUMMARY_FILE, CELL_TIMING_FILE, FAILURES_FILE, Cell, StudyConfig

DONE, REUSED, STARTED, FAILED, PENDING = "done", "reused", "started", "failed", "pending"


@dataclasses.dataclass(frozen=True)
class CellState:
  """One cell's state.

  Attributes:
    cell: the cell.
    status: DONE (its summary is in the results folder or its run folder), REUSED (done
      by taking a finished twin's results), STARTED (a run folder or recorded attempts, not
      finished: running now or interrupted; the next run resumes it), FAILED (recorded in
      `failures.json` by a `--keep_going` run, not finished since), PENDING.
    seconds: a finished cell's recorded wall time; a started or failed one's attempts
      so far; 0 for a pending one.
    detail: where a started cell stands (edit checkpoint, robustness outputs), a
      reused cell's original, a failed cell's error.
    control_seconds: the part of a finished cell's `seconds` spent in the unedited
      control's stages (`UNEDITED_CONTROL_STAGES`): minutes in the cell that computed
      its seed's control, seconds (reading it) in the others; 0 without stage records.
  """

  cell: Cell
  status: str
  seconds: float = 0.0
  detail: str = ""
  control_seconds: float = 0.0


# A setting and seed: the cells that share one unedited control.
ControlKey = tuple[str, int]


def _control_key(cell: Cell) -> ControlKey:
  return (cell.setting, cell.seed)


def _control_seconds(summary: dict) -> float:
  """Seconds a cell summary's top-level unedited-control stages took, every attempt."""
  return float(sum(
    e.get("seconds", 0.0) for e in summary.get("stage_seconds", [])
    if e.get("parent") is None and e.get("stage") in UNEDITED_CONTROL_STAGES
  ))


def _started_detail(run_dir: pathlib.Path, total_steps: int) -> str:
  """Where a started cell resumes: its latest edit checkpoint, or once the edit is
  evaluated, how many robustness outputs are written."""
  layout = RunLayout(run_dir)
  robustness = layout.robustness("edited")
  if layout.evaluation("edited").is_file():
    written = sorted(p.stem for p in robustness.glob("*.json")) if robustness.is_dir() else []
    return f"edit done; robustness outputs written: {', '.join(written) or 'none'}"
  checkpoints = layout.checkpoints()
  if checkpoints.is_dir():
    from absl import logging  # pylint: disable=g-import-not-at-top
    from mech_unlearn_jax.train import checkpoint  # pylint: disable=g-import-not-at-top  (orbax: only when needed)

    # orbax warns that a read-only manager will not save; that is the point here.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
      with checkpoint.CheckpointManager(checkpoints, read_only=True) as manager:  # the study may be writing it
        step = manager.latest_step()
    finally:
      logging.set_verbosity(verbosity)
    if step is not None:
      return f"edit checkpoint at step {step} of {total_steps}"
  return "before the edit's first checkpoint"


def cell_states(
  config: StudyConfig,
  workdir: str | pathlib.Path,
  out_dir: str | pathlib.Path,
  only_settings: Sequence[str] = (),
  only_methods: Sequence[str] = (),
  only_seeds: Sequence[int] = (),
) -> list[CellState]:
  """The state of every cell of the study (or of the `only_*` subset), in run order."""
  workdir, out_dir = pathlib.Path(workdir), pathlib.Path(out_dir)
  failures_path = out_dir / FAILURES_FILE
  failures = io.read_json(failures_path, "study failures") if failures_path.is_file() else {}
  states = []
  for cell in config.cells(only_settings, only_methods, only_seeds):
    run_dir = cell.run_dir(workdir)
    summary_path = out_dir / "cells" / cell.summary_name
    if not summary_path.is_file():
      summary_path = run_dir / CELL_SUMMARY_FILE  # finished in this workdir, not yet copied
    if summary_path.is_file():
      summary = io.read_json(summary_path, "study cell summary")
      seconds = float(summary.get("cell_seconds", 0.0))
      if "reused_from" in summary:
        states.append(CellState(cell, REUSED, seconds, f"the same edit as {summary['reused_from']}"))
      else:
        states.append(CellState(cell, DONE, seconds, control_seconds=_control_seconds(summary)))
      continue
    timing_path = run_dir / CELL_TIMING_FILE
    attempts = io.read_json(timing_path, "cell timing").get("attempts", []) if timing_path.is_file() else []
    seconds = float(sum(attempts))
    # Recorded attempts live in the run folder, so either means the cell has started.
    resume = _started_detail(run_dir, config.cell_spec(cell).edit.steps) if run_dir.is_dir() else None
    if cell.label in failures:
      # A failure stays recorded until the cell finishes; a later attempt that got
      # further (interrupted after the bug was fixed) says where a rerun resumes.
      detail = failures[cell.label] + (f"; resumes at: {resume}" if resume else "")
      states.append(CellState(cell, FAILED, seconds, detail))
    elif resume:
      # An attempt's time is recorded when it ends: a run folder without one is the first
      # attempt, running now (or killed without a chance to record it).
      attempts_text = f"{len(attempts)} attempt(s) recorded" if attempts else "first attempt running or killed"
      states.append(CellState(cell, STARTED, seconds, f"{attempts_text}; {resume}"))
    else:
      states.append(CellState(cell, PENDING))
  return states


def _finished_ran(states: Sequence[CellState], setting: str) -> list[CellState]:
  """The finished cells that ran (not reused) in `setting`, else in any setting."""
  for same_setting in (True, False):
    ran = [s for s in states if s.status == DONE and s.seconds > 0 and (not same_setting or s.cell.setting == setting)]
    if ran:
      return ran
  return []


def pace(states: Sequence[CellState], setting: str) -> float | None:
  """Median wall time, less the unedited control, of the finished cells that ran (not
  reused) in `setting`, else in any setting; None before the first."""
  ran = _finished_ran(states, setting)
  return statistics.median(s.seconds - s.control_seconds for s in ran) if ran else None


def control_pace(states: Sequence[CellState]) -> float:
  """The longest unedited control a finished cell computed, in any setting; 0 when no
  finished cell recorded its stages. The longest, not a median: a seed's control may
  have been computed in part before (another budget's study shares it), and a
  deadline should err towards not starting a cell; the settings' controls take
  similar time (the same attacks on the same model)."""
  return max((s.control_seconds for s in states if s.status == DONE), default=0.0)


def controls_done(states: Sequence[CellState]) -> set[ControlKey]:
  """The settings and seeds whose unedited control a finished cell computed."""
  return {_control_key(s.cell) for s in states if s.status in (DONE, REUSED)}


def _control_to_add(states: Sequence[CellState], cell: Cell, controls: set[ControlKey] | None) -> float:
  """`control_pace` when `cell`'s seed has no control in `controls` (default:
  `controls_done(states)`), else 0."""
  controls = controls_done(states) if controls is None else controls
  return control_pace(states) if _control_key(cell) not in controls else 0.0


def seconds_left(
  states: Sequence[CellState], state: CellState, controls: set[ControlKey] | None = None
) -> float | None:
  """Wall time `state`'s cell still needs at its setting's `pace`, plus
  `control_pace` when its seed's control is not in `controls` (default:
  `controls_done(states)`): 0 once done or reused, that less the attempts so far for a
  started cell; None before any cell has finished."""
  if state.status in (DONE, REUSED):
    return 0.0
  per_cell = pace(states, state.cell.setting)
  if per_cell is None:
    return None
  per_cell += _control_to_add(states, state.cell, controls)
  return max(per_cell - state.seconds, 0.0) if state.status == STARTED else per_cell


def remaining_seconds(states: Sequence[CellState], paced_by: Sequence[CellState] | None = None) -> float | None:
  """Wall time left if the unfinished cells of `states` run in order at their
  setting's pace among `paced_by` (default: `states`; the whole study's for a filtered
  plan, as the runner paces), each seed's control counted once; None when no cell has
  finished. An upper bound where cells turn out to be twins of finished ones (seconds
  each): whether a cell is a twin is known only once its localization ran."""
  paced_by = states if paced_by is None else paced_by
  controls, total = controls_done(paced_by), 0.0
  for s in states:
    needed = seconds_left(paced_by, s, controls)
    if needed is None:
      return None
    total += needed
    controls.add(_control_key(s.cell))
  return total


def past_deadline(
  states: Sequence[CellState], cell: Cell, now: float, finish_by: float, controls: set[ControlKey] | None = None
) -> str | None:
  """Why `cell` should not start at `now` (epoch seconds) in a run that must end by
  `finish_by`: it would end later at its `seconds_left`; None when it fits, is
  finished, or no cell has set a pace yet (then nothing can be estimated and it runs)."""
  [state] = [s for s in states if s.cell == cell]
  needed = seconds_left(states, state, controls)
  if not needed or now + needed <= finish_by:
    return None
  control = _control_to_add(states, cell, controls)
  with_control = f" (with its seed's unedited control, {control / 60:.1f} min)" if control else ""
  return (
    f"{cell.label} needs about {needed / 60:.1f} min at the median finished cell's pace{with_control} and"
    f" {max(finish_by - now, 0.0) / 60:.1f} min are left before the finish time"
  )


def cells_before(
  states: Sequence[CellState], now: float, finish_by: float, paced_by: Sequence[CellState] | None = None
) -> list[CellState] | None:
  """The unfinished cells of `states` a run started at `now` would start, in order,
  before it stops at the first one that would end after `finish_by` (the runner's rule:
  `past_deadline`, each cell taking its `seconds_left` at the pace of `paced_by`: the
  whole study's states, which hold `states`' cells, default `states`); None before any
  cell has finished."""
  paced_by = states if paced_by is None else paced_by
  started, clock, controls = [], now, controls_done(paced_by)
  for s in states:
    if s.status in (DONE, REUSED):
      continue
    needed = seconds_left(paced_by, s, controls)
    if needed is None:
      return None
    if past_deadline(paced_by, s.cell, clock, finish_by, controls):
      break
    started.append(s)
    clock += needed
    controls.add(_control_key(s.cell))
  return started


def plan_markdown(
  states: Sequence[CellState],
  now: float | None = None,
  finish_by: float | None = None,
  paced_by: Sequence[CellState] | None = None,
) -> str:
  """Counts per setting and status, the time left, and one line per unfinished cell of
  `states`; with `finish_by` (and `now`, epoch seconds), which cells a run started now
  would start. Paces come from `paced_by` (default `states`): for a plan of some cells,
  the whole study's states, which is what the runner paces its cells by."""
  paced_by = states if paced_by is None else paced_by
  statuses = (DONE, REUSED, STARTED, FAILED, PENDING)
  pace_header = "pace (median finished cell, less the unedited control)"
  out = ["| setting | " + " | ".join(statuses) + f" | {pace_header} |", "|---" * (len(statuses) + 2) + "|"]
  for setting in dict.fromkeys(s.cell.setting for s in states):
    mine = [s for s in states if s.cell.setting == setting]
    per_cell = pace(paced_by, setting)
    counts = " | ".join(str(sum(s.status == st for s in mine)) for st in statuses)
    if per_cell is None:
      pace_text = "-"
    else:
      own = any(s.status == DONE and s.seconds > 0 and s.cell.setting == setting for s in paced_by)
      pace_text = f"{per_cell / 60:.0f} min" + ("" if own else " (other settings')")
    out.append(f"| {setting} | {counts} | {pace_text} |")
  left = remaining_seconds(states, paced_by)
  finished = sum(s.status in (DONE, REUSED) for s in states)
  out.append("")
  out.append(
    f"{finished} of {len(states)} cells finished; "
    + ("time left: unknown (no finished cell yet)" if left is None else f"time left at this pace: about {left / 3600:.1f} h")
    + " (twins of finished cells take seconds, so this is an upper bound)."
  )
  control = control_pace(paced_by)
  if control:
    out.append(
      f"A setting's first cell of a seed also computes the seed's unedited control: {control / 60:.0f} min more"
      " (the longest so far)."
    )
  if finish_by is not None:
    fitting = cells_before(states, time.time() if now is None else now, finish_by, paced_by)
    until = time.strftime("%Y-%m-%d %H:%M", time.localtime(finish_by))
    out.append("")
    if fitting is None:
      out.append(f"Cells that end by {until}: unknown (no finished cell yet sets a pace).")
    else:
      labels = ", ".join(s.cell.label for s in fitting) or "none"
      out.append(f"Cells a run started now would start and end by {until} at this pace ({len(fitting)}): {labels}.")
  unfinished = [s for s in states if s.status in (STARTED, FAILED)]
  if unfinished:
    out.append("")
    out.extend(f"- {s.cell.label}: {s.status}, {s.seconds:.0f} s so far; {s.detail}" for s in unfinished)
  return "\n".join(out) + "\n"
