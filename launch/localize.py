"""Localizes facts with fact lookup, AP and CT; writes scores, masks and evidence.

  python -m launch.localize --config=configs/localize_sports.py --workdir=runs/localize_sports

See `configs/localize_sports.py` for the options and `mech_unlearn_jax/localize/
pipeline.py` for what lands in the workdir.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory.", required=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax.localize import pipeline  # pylint: disable=g-import-not-at-top

  logging.info("devices: %s", jax.devices())
  spec = pipeline.LocalizationSpec.from_dict(FLAGS.config.to_dict())
  summary = pipeline.run_localization(spec, FLAGS.workdir)
  print(json.dumps({k: summary[k] for k in ("fact_lookup", "masks") if k in summary}, indent=1))


if __name__ == "__main__":
  app.run(main)
