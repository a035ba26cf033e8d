"""Sweep the edit learning rate, then the forget coefficient; score standard-format metrics only.

  python -m launch.sweep --config=configs/sports_first16.py:ap --workdir=runs/sweep_ap \
      --lrs=1e-5,3e-5,1e-4,3e-4 --forget_coefs=1,0.3,3

The sweep edits at the config's budget: the reference's 50 x 64 by default, the short
30 x 16 with `:short_budget` (e.g. `--config=configs/sports_first16.py:ap,short_budget`;
`docs/sweeps.md` has both).

Each setting is a main job (standard format only, no attacks) in `WORKDIR/lr<lr>_cf<cf>`,
sharing the knowledge filter, fact-lookup evidence and unedited evaluation in
`WORKDIR/shared`; `WORKDIR/sweep.json` holds every row and the best, and
`WORKDIR/sweep.md` the same as a table, both rewritten after every setting (a stopped
sweep says so in its table; the same command resumes it).
"""

from absl import app, flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/sports_first16.py", "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Sweep directory (one sub-workdir per setting).", required=True)
flags.DEFINE_list("lrs", ["1e-5", "3e-5", "1e-4"], "Learning rates.")
flags.DEFINE_list("forget_coefs", ["1"], "Forget-loss coefficients c_f (the first is used while sweeping lr).")
flags.DEFINE_bool("staged", True, "Sweep lr at the first c_f, then c_f at the best lr (METHOD §3); else the product.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  from mech_unlearn_jax import experiment, sweep  # pylint: disable=g-import-not-at-top

  def job():
    base = experiment.ExperimentSpec.from_dict(FLAGS.config.to_dict())
    rows = sweep.run_sweep(
        base, FLAGS.workdir, [float(x) for x in FLAGS.lrs], [float(x) for x in FLAGS.forget_coefs], staged=FLAGS.staged
    )
    for row in sorted(rows, key=lambda r: -r["score"]):
      print(row)

  common.guarded(job)


if __name__ == "__main__":
  app.run(main)
