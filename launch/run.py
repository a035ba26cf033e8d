"""The main job: localize -> edit -> evaluate (see `mech_unlearn_jax/experiment.py`).

  python -m launch.run --config=configs/sports_first16.py --workdir=runs/sports_first16
  python -m launch.run --config=configs/sports_first16.py:ap --config.edit.lr=2e-5 --workdir=runs/ap

Rerunning with the same --workdir resumes: finished stages are skipped and the edit
continues from its latest checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/sports_first16.py", "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where results and checkpoints go.", required=True)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax import experiment  # pylint: disable=g-import-not-at-top

  if FLAGS.distributed:
    jax.distributed.initialize()
  logging.info("devices: %s", jax.devices())
  try:
    spec = experiment.ExperimentSpec.from_dict(FLAGS.config.to_dict())
  except ValueError as e:
    logging.error("%s", e)
    sys.exit(2)
  results = experiment.run_experiment(spec, FLAGS.workdir)
  print(open(f"{FLAGS.workdir}/results.md").read())
  logging.info("timings: %s", results["timings_s"])


if __name__ == "__main__":
  app.run(main)
