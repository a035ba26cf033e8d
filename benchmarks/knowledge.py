"""Knowledge scan: the main job's first stage, with and without shared-prefix scoring.

  python -m benchmarks.knowledge                 # sports, all 1559 reference facts
  python -m benchmarks.knowledge --task=counterfact --max_facts=512

Builds the task's knowledge-format batch exactly as `experiment.stages.knowledge_stage`
does and scores it with `evals.scoring.score_facts` twice in one process: every row
run whole (`share_prefix=False`) and the tokens all rows share (the one-shot example)
run once per chunk. Prints, for each, the first call (compile + run) and the steady
state in prompts/s, MFU against an fp32 matmul timed in the same process (useful
FLOPs of the whole rows, so the shared-prefix MFU counts the work it avoided), the
ratio, and the largest difference between the two runs' probabilities.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from absl import app, flags

from benchmarks import common
from mech_unlearn_jax.data.tasks import get_task
from mech_unlearn_jax.evals import scoring
from mech_unlearn_jax.experiment.spec import ExperimentSpec
from mech_unlearn_jax.models import loaders

FLAGS = flags.FLAGS
flags.DEFINE_string("task", "sports", "Task name (data.task).")
flags.DEFINE_integer("max_facts", 0, "Score only the first N facts (0: all).")
flags.DEFINE_integer("batch_size", 64, "Prompts per chunk (eval.batch_size).")
flags.DEFINE_string("model", "default", "Model spec.")


def _timed(fn):
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  t = time.perf_counter()
  out = fn()
  return out, first, time.perf_counter() - t


def main(argv):
  del argv
  spec = ExperimentSpec()
  data = dataclasses.replace(spec.data, task=FLAGS.task, max_facts=FLAGS.max_facts)
  task = get_task(FLAGS.task)
  model, tokenizer = loaders.load_model_and_tokenizer(FLAGS.model)
  facts = task.load(data)
  if data.max_facts:
    facts = facts[: data.max_facts]
  batch = task.fact_batch(tokenizer, task.knowledge_format(data), facts)
  lengths = (np.asarray(batch.positions_BxL) >= 0).sum(1)
  prefix = scoring.shared_prefix_length(np.asarray(batch.tokens_BxL), np.asarray(batch.positions_BxL))
  peak = common.matmul_peak_flops()
  flops = common.forward_flops(model.config, lengths.tolist())
  runs = {}
  for name, share in (("whole rows", False), ("shared prefix", True)):
    runs[name] = _timed(lambda share=share: scoring.score_facts(model, batch, FLAGS.batch_size, share_prefix=share))
  print(f"{FLAGS.task}: {batch.size} prompts, {lengths.mean():.1f} tokens on average, shared prefix {prefix} tokens")
  print(f"matmul peak (fp32, same process): {peak / 1e9:.1f} GFLOP/s")
  for name, (_, first, wall) in runs.items():
    print(f"{name:>13}: first call {first:.1f} s, steady {wall:.2f} s = {batch.size / wall:.1f} prompts/s,"
          f" MFU {flops / wall / peak:.1%}")
  whole, shared = runs["whole rows"][0], runs["shared prefix"][0]
  print(f"speedup (steady): {runs['whole rows'][2] / runs['shared prefix'][2]:.2f}x")
  print(f"max |p_normalized difference|: {np.abs(whole.prob_normalized - shared.prob_normalized).max():.2e};"
        f" argmax agreement {np.mean(whole.correct_argmax_candidates == shared.correct_argmax_candidates):.2%}")
  print(f"peak RSS: {common.peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
  app.run(main)
