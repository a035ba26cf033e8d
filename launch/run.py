"""The main job: localize -> edit -> evaluate (see `mech_unlearn_jax/experiment/run.py`).

  python -m launch.run --config=configs/sports_first16.py --workdir=runs/sports_first16
  python -m launch.run --config=configs/sports_first16.py:ap --config.edit.lr=2e-5 --workdir=runs/ap
  python -m launch.run --config=configs/sports_first16.py:ap,short_budget --workdir=runs/ap_short

The edit runs at the reference's budget (50 steps of 64 examples per term) unless the
config argument names `short_budget` (30 steps of 16, the earlier default; see
`configs/common.py`).

Rerunning with the same --workdir resumes: finished stages are read back and the edit
continues from its latest checkpoint; a finished run only re-reports.

Runs of one setting with other methods or edit values can share the stages that do not
depend on them (knowledge filter, fact-lookup evidence, the unedited model's evaluation
and robustness control: a quarter hour of a default run here) through one folder:

  python -m launch.run --config=configs/sports_first16.py --workdir=runs/flu --shared_dir=runs/shared
  python -m launch.run --config=configs/sports_first16.py:ap --workdir=runs/ap --shared_dir=runs/shared

Its subfolders are keyed by what each output depends on
(`experiment.run.keyed_shared_outputs`), so a run that differs in any of that (another
seed, split or model) computes its own.
"""

import pathlib

import sys

from absl import app, flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/sports_first16.py", "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where results and checkpoints go.", required=True)
flags.DEFINE_string(
    "shared_dir", "", "Share the method- and edit-independent stages with other runs through this folder."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  from mech_unlearn_jax import experiment  # pylint: disable=g-import-not-at-top

  def job():
    spec = experiment.ExperimentSpec.from_dict(FLAGS.config.to_dict())
    shared = None
    if FLAGS.shared_dir:
      setting = f"{spec.data.task}_{spec.data.split}"
      shared = experiment.keyed_shared_outputs(spec, pathlib.Path(FLAGS.shared_dir), setting)
    experiment.run_experiment(spec, FLAGS.workdir, shared=shared)
    with open(f"{FLAGS.workdir}/results.md") as f:
      print(f.read())

  common.guarded(job)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
