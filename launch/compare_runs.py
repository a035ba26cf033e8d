"""Compare groups of finished runs: per metric, each group's mean and interval over its
seeds, and each group minus the first, paired by seed.

  python -m launch.compare_runs --group=default:runs/cheap_seed0,runs/cheap_seed1,runs/cheap_seed2 \
      --group=reference:runs/ref_seed0,runs/ref_seed1,runs/ref_seed2 --out=docs/findings/budget_table.md

Reads each workdir's results.json (`mech_unlearn_jax/study/compare_runs.py`); no model.
"""

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("group", None, "NAME:WORKDIR[,WORKDIR...]; repeat per group (the first is the baseline).")
flags.DEFINE_list("metrics", [], "Metrics to show (default: every metric all runs have, without _argmax).")
flags.DEFINE_bool("argmax", False, "Also show the _argmax metrics (with the default metric list).")
flags.DEFINE_float("confidence", 0.95, "Coverage of the t-intervals.")
flags.DEFINE_string("out", None, "Also write the table to this markdown file.")
flags.mark_flag_as_required("group")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from mech_unlearn_jax import io  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax.study import compare_runs  # pylint: disable=g-import-not-at-top

  def job():
    groups = [compare_runs.parse_group(g) for g in FLAGS.group]
    text = compare_runs.compare_runs(groups, FLAGS.metrics, FLAGS.argmax, FLAGS.confidence)
    if FLAGS.out:
      io.write_text(FLAGS.out, text)
    print(text)

  common.guarded(job)


if __name__ == "__main__":
  app.run(main)
