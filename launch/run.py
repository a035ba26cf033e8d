"""The main job: localize -> edit -> evaluate (see `mech_unlearn_jax/experiment/run.py`).

  python -m launch.run --config=configs/sports_first16.py --workdir=runs/sports_first16
  python -m launch.run --config=configs/sports_first16.py:ap --config.edit.lr=2e-5 --workdir=runs/ap
  python -m launch.run --config=configs/sports_first16.py:ap,short_budget --workdir=runs/ap_short

The edit runs at the reference's budget (50 steps of 64 examples per term) unless the
config argument names `short_budget` (30 steps of 16, the earlier default; see
`configs/common.py`).

Rerunning with the same --workdir resumes: finished stages are read back and the edit
continues from its latest checkpoint; a finished run only re-reports.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/sports_first16.py", "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where results and checkpoints go.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  from mech_unlearn_jax import experiment  # pylint: disable=g-import-not-at-top

  def job():
    spec = experiment.ExperimentSpec.from_dict(FLAGS.config.to_dict())
    experiment.run_experiment(spec, FLAGS.workdir)
    with open(f"{FLAGS.workdir}/results.md") as f:
      print(f.read())

  common.guarded(job)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
