"""Baseline report on the unedited model: knowledge-filter counts, accuracy per format.

  python -m launch.baseline --workdir=runs/baseline
  python -m launch.baseline --workdir=runs/baseline \
      --sports=embedded,../shared/data/reference/sports.csv \
      --counterfact=../shared/data/reference/counterfact_with_prompts.csv \
      --counterfact_mc=../shared/data/reference/counterfact_mc_questions.parquet
"""

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where baseline.json and baseline.md go.", required=True)
flags.DEFINE_string("model", "default", "Model spec.")
flags.DEFINE_list("sports", ["embedded"], "Sports tables: 'embedded' and/or CSV paths.")
flags.DEFINE_string("counterfact", "", "CounterFact CSV with paraphrase/neighborhood prompts ('' skips).")
flags.DEFINE_string("counterfact_mc", "", "CounterFact MC questions parquet.")
flags.DEFINE_float("threshold", 0.5, "Knowledge filter threshold.")
flags.DEFINE_integer("max_eval_per_sport", 50, "Known athletes per sport evaluated in every format.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  from mech_unlearn_jax import baseline  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax.models import loaders  # pylint: disable=g-import-not-at-top

  def job():
    spec = baseline.BaselineSpec(
        sports_sources=tuple(FLAGS.sports), counterfact_path=FLAGS.counterfact,
        counterfact_mc_path=FLAGS.counterfact_mc, threshold=FLAGS.threshold,
        max_eval_per_sport=FLAGS.max_eval_per_sport,
    )
    model, tokenizer = loaders.load_model_and_tokenizer(FLAGS.model)
    result = baseline.run_baseline(model, tokenizer, spec, FLAGS.workdir)
    print(baseline.markdown(result))

  common.guarded(job)


if __name__ == "__main__":
  app.run(main)
