"""Planted facts: plant, localize, edit, evaluate (see `mech_unlearn_jax/plant.py`).

  python -m launch.plant --config=configs/plant_sports.py --workdir=runs/plant_sports
  python -m launch.plant --config=configs/plant_sports.py:tiny --workdir=/tmp/plant_tiny

Rerunning with the same --workdir resumes: finished stages are read back, planting and
edits continue from their latest orbax checkpoints; a finished run only re-reports.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/plant_sports.py", "Planting config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where results, the planted models and checkpoints go.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  from mech_unlearn_jax import plant  # pylint: disable=g-import-not-at-top

  def job():
    config = plant.PlantConfig.from_dict(FLAGS.config.to_dict())
    plant.run_plant(config, FLAGS.workdir)
    with open(f"{FLAGS.workdir}/results.md", encoding="utf-8") as f:
      print(f.read())

  common.guarded(job)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
