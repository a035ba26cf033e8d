"""The reproduction study: settings x methods x seeds (see `mech_unlearn_jax/study/`).

  python -m launch.study --config=configs/study_sports.py --workdir=runs/study_reference \
      --results_dir=docs/results/reference_budget
  python -m launch.study --config=configs/study_sports.py --workdir=runs/study_reference \
      --only_settings=sports_random16 --only_seeds=0 --max_cells=3
  python -m launch.study --config=configs/study_sports.py:tiny --workdir=/tmp/study
  python -m launch.study --config=configs/study_sports.py:short_budget --workdir=runs/study \
      --results_dir=docs/results/short_budget --report_only
  python -m launch.study --config=configs/study_sports.py --workdir=runs/study_reference \
      --results_dir=docs/results/reference_budget --plan --only_seeds=0,1,2

Rerunning the same command resumes: finished cells are skipped, a killed cell resumes
from its stages and checkpoints. `--commit_results` commits the results folder (and
only it) after every finished cell, so an interrupted study's results are kept.
`--finish_by=2026-12-07T18:30` starts no cell that would end later at the finished
cells' pace (plus the unedited control where the cell is its seed's first), so a job
with a wall-time limit stops between cells. `--plan` reads what
is done and what a rerun will do (and how long, at the finished cells' pace: the whole
study's, with or without `--only_*`, as the runner's) without loading the model or
taking the workdir's lock.
"""

import datetime
import pathlib
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/study_sports.py", "Study config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Cells' runs and shared stage outputs.", required=True)
flags.DEFINE_string("results_dir", "", "study.csv, study.md, figures, cell summaries (default: WORKDIR/results).")
flags.DEFINE_list("only_settings", [], "Run only these settings.")
flags.DEFINE_list("only_methods", [], "Run only these methods.")
flags.DEFINE_list("only_seeds", [], "Run only these seeds.")
flags.DEFINE_integer("max_cells", 0, "Stop after running this many cells (0: all).")
flags.DEFINE_string(
  "finish_by",
  "",
  "Start no cell that would end after this time at the finished cells' median pace; the study"
  " stops there (ISO 8601, e.g. 2026-12-07T18:30 or 2026-12-07T18:30+01:00; without an offset,"
  " the machine's local time). For a job with a wall-time limit; with --plan, lists the cells that fit.",
)
flags.DEFINE_bool("keep_going", False, "Record a failing cell and continue with the next.")
flags.DEFINE_bool("commit_results", False, "git-commit --results_dir after every finished cell.")
# A study runs many cells of one model in one process: the attacks' and scorers'
# executables are the same from cell to cell, and a persistent-cache read of the
# largest (the LoRA step) costs more than compiling it (docs/performance.md).
FLAGS.set_default("keep_compiled", "auto")
flags.DEFINE_bool("report_only", False, "Only rebuild study.csv/md and the figures from the finished cells' summaries.")
flags.DEFINE_bool(
  "plan", False, "Only print each cell's state (done, reused, started, failed, pending) and the time left; runs nothing."
)


def commit_results(path: str, message: str, attempts: int = 10) -> None:
  """`git add` + `git commit` of `path` only (retries while another commit holds the index)."""
  for attempt in range(attempts):
    out = subprocess.run(["git", "add", "--", path], capture_output=True, text=True)
    if out.returncode == 0:
      # Nothing staged under `path`: nothing to commit, which is not an error.
      if subprocess.run(["git", "diff", "--cached", "--quiet", "--", path]).returncode == 0:
        return
      out = subprocess.run(["git", "commit", "-q", "-m", message, "--", path], capture_output=True, text=True)
      if out.returncode == 0:
        return
    text = out.stdout + out.stderr
    if "index.lock" in text and attempt < attempts - 1:
      time.sleep(3)
      continue
    # Reported, never fatal: the results stay on disk for the next commit.
    print(f"study: git commit of {path} failed: {text.strip()}", file=sys.stderr)
    return


def parse_finish_by(text: str) -> float | None:
  """`--finish_by` as `time.time()` seconds (None when empty)."""
  if not text:
    return None
  try:
    return datetime.datetime.fromisoformat(text).timestamp()
  except ValueError:
    raise ValueError(f"--finish_by must be an ISO 8601 time such as 2026-12-07T18:30, got {text!r}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  from mech_unlearn_jax import study  # pylint: disable=g-import-not-at-top

  def job():
    config = study.StudyConfig.from_dict(FLAGS.config.to_dict())
    try:
      seeds = [int(s) for s in FLAGS.only_seeds]
    except ValueError:
      raise ValueError(f"--only_seeds must be integers, got {FLAGS.only_seeds}") from None
    results_dir = FLAGS.results_dir or f"{FLAGS.workdir}/results"
    finish_by = parse_finish_by(FLAGS.finish_by)
    if FLAGS.plan:
      # The runner paces cells by the whole study's finished cells, so the plan of a
      # subset (`--only_*`) does too.
      whole_study = study.cell_states(config, FLAGS.workdir, results_dir)
      shown = set(config.cells(FLAGS.only_settings, FLAGS.only_methods, seeds))
      states = [s for s in whole_study if s.cell in shown]
      print(study.plan_markdown(states, finish_by=finish_by, paced_by=whole_study), end="")
      return
    if FLAGS.report_only:
      data = study.write_outputs(config, pathlib.Path(results_dir))
      print(f"study: report of {len(data.summaries)} finished cells in {results_dir}/study.md")
      return

    def on_cell_done(outcome, data):
      how = "reused a finished cell's identical edit" if outcome.status == "reused" else "finished"
      print(
        f"study: {outcome.cell.label} {how} in {outcome.seconds:.0f} s ({len(data.summaries)} cells done)",
        file=sys.stderr,
        flush=True,
      )
      if FLAGS.commit_results:
        twin = " (the same edit as a finished cell: its results)" if outcome.status == "reused" else ""
        commit_results(results_dir, f"Study results: {outcome.cell.label} ({outcome.seconds:.0f} s){twin}")

    outcomes = study.run_study(
      config,
      FLAGS.workdir,
      results_dir,
      only_settings=FLAGS.only_settings,
      only_methods=FLAGS.only_methods,
      only_seeds=seeds,
      max_cells=FLAGS.max_cells,
      finish_by=finish_by,
      keep_going=FLAGS.keep_going,
      on_cell_done=on_cell_done,
    )
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ran", "reused", "skipped", "failed")}
    if FLAGS.commit_results:
      # What changed outside a finished cell: mask records backfilled at the start, a
      # failed cell's record, the report rebuilt over them (nothing, usually).
      commit_results(results_dir, f"Study results: records and report after the run ({len(outcomes)} cells visited)")
    print(
      f"study: {counts['ran']} cells ran, {counts['reused']} reused an identical finished edit,"
      f" {counts['skipped']} were finished before, {counts['failed']} failed; see {results_dir}/study.md"
    )
    if counts["failed"]:
      sys.exit(1)

  common.guarded(job)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
