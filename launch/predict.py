"""Prints the top-k next tokens of a prompt with their log-probabilities.

  python -m launch.predict --prompt="Fact: Tiger Woods plays the sport of golf
Fact: LeBron James plays the sport of" --top_k=5
  python -m launch.predict --prompt="The capital of France is" --json

`--json` prints {"ids": [...], "top_ids": [...], "top_logprobs": [...]} for the last
position, ids as the tokenizer gives them (with BOS). The table ends with the number
of rows printed (fewer than --top_k when the vocabulary is smaller). A prompt longer
than the model's context, or a bad model, is a one-line error and exit status 2.
"""

import json
import sys

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_string("prompt", None, "Text to continue.", required=True)
flags.DEFINE_integer("top_k", 5, "How many next tokens to print.", lower_bound=1)
flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
flags.DEFINE_string(
    "model", "default", "'default' (Gemma 3 270M GGUF), a .gguf path, a checkpoint dir or a tiny-* preset."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  from mech_unlearn_jax import predict  # pylint: disable=g-import-not-at-top

  def job():
    result = predict.top_next_tokens(FLAGS.model, FLAGS.prompt, FLAGS.top_k)
    if FLAGS.json:
      print(json.dumps({k: result[k] for k in ("ids", "top_ids", "top_logprobs")}))
      return
    rows = list(zip(result["top_ids"], result["top_logprobs"], result["top_pieces"]))
    print(f"{len(result['ids'])} prompt tokens; top {FLAGS.top_k} next tokens:")
    for tid, lp, piece in rows:
      print(f"{tid:>8d}  {lp:9.4f}  {piece!r}")
    print(f"{len(rows)} rows printed")

  common.guarded(job)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
