"""Localization alone: the masks of several methods on one experiment config's facts.

  python -m launch.localize --config=configs/localize_sports.py --workdir=runs/localize_sports
  python -m launch.localize --config=configs/sports_first16.py --methods=fact_lookup,ap,ct,random --workdir=runs/loc

Runs the main job's knowledge, split and localization stages (the same functions, the
same config schema) for every method in --methods. Writes `knowledge.json`,
`split.json`, the shared fact-lookup evidence in `localization/fact_lookup/`, and
per method `localization/<method>/{mask.npz,localization.json}` (AP/CT scores too).
"""

import json
import pathlib

from absl import app, flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory.", required=True)
flags.DEFINE_list("methods", ["fact_lookup", "ap", "ct"], "Localization methods (see localize.select.METHODS).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  from mech_unlearn_jax.experiment import localize_only  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax.experiment import ExperimentSpec  # pylint: disable=g-import-not-at-top

  def job():
    spec = ExperimentSpec.from_dict(FLAGS.config.to_dict())
    summary = localize_only(spec, FLAGS.methods, pathlib.Path(FLAGS.workdir))
    print(json.dumps(summary, indent=1))

  common.guarded(job)


if __name__ == "__main__":
  app.run(main)
