"""The robustness suite on a finished run, without redoing the edit.

  python -m launch.attack --workdir=runs/sports_first16
  python -m launch.attack --workdir=runs/sports_first16 --stages=relearn,probes

Restores the edited model from the run's checkpoint and runs the relearning attacks,
latent probes, soft-prompt attacks and side-effect evaluations on it and on the
unedited control; results.json/md and the plots of the run are rebuilt with them.
"""

import dataclasses

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A finished run's workdir.", required=True)
flags.DEFINE_list("stages", [], "Subset of relearn,probes,soft_prompt,trivia (default: the run's, or all).")

STAGES = ("relearn", "probes", "soft_prompt", "trivia")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  from mech_unlearn_jax import experiment  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax.experiment.robustness import RobustnessConfig  # pylint: disable=g-import-not-at-top

  def job():
    config = None
    if FLAGS.stages:
      bad = [s for s in FLAGS.stages if s not in STAGES]
      if bad:
        raise ValueError(f"--stages: unknown stage(s) {bad}; expected some of {STAGES}")
      config = dataclasses.replace(RobustnessConfig(), **{s: s in FLAGS.stages for s in STAGES})
    experiment.attack_only(FLAGS.workdir, config)
    with open(f"{FLAGS.workdir}/results.md") as f:
      print(f.read())

  common.guarded(job)


if __name__ == "__main__":
  app.run(main)
