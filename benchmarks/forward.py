"""Forward benchmark: score the 1559 reference sports prompts at the last position.

  python -m benchmarks.forward --sports_csv=../shared/data/reference/sports.csv

Prints prompts/s, MFU against a fp32 matmul peak timed in the same run, first-call
compile time and peak RSS. Prompts are sorted by length so batches carry little
padding, and lengths are rounded up to a multiple of 8 so few shapes compile.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import pandas as pd
from absl import app, flags

from benchmarks import common
from mech_unlearn_jax.models import forward, loaders
from mech_unlearn_jax.models.loaders import load_tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_string("sports_csv", "../shared/data/reference/sports.csv", "Reference sports facts.")
flags.DEFINE_integer("batch_size", 64, "Prompts per forward pass.")
flags.DEFINE_integer("pad_multiple", 8, "Round sequence lengths up to this multiple.")
flags.DEFINE_string("model", "default", "Model spec.")


def main(argv):
  del argv
  prompts = pd.read_csv(FLAGS.sports_csv)["prompt"].tolist()
  tokenizer = load_tokenizer(FLAGS.model)
  model = loaders.load_model(FLAGS.model)
  sequences = tokenizer.encode_batch(prompts, add_bos=True)
  order = np.argsort([len(s) for s in sequences], kind="stable")
  batches = []
  for start in range(0, len(order), FLAGS.batch_size):
    rows = [sequences[i] for i in order[start : start + FLAGS.batch_size]]
    batches.append(forward.left_pad(rows, multiple=FLAGS.pad_multiple))
  shapes = sorted({b[0].shape for b in batches})

  peak = common.matmul_peak_flops()
  # Compile every distinct shape once, timed separately from the steady state.
  t = time.perf_counter()
  forward.jitted_last_logits(model, *batches[0]).block_until_ready()
  first_call = time.perf_counter() - t
  t = time.perf_counter()
  for shape in shapes:
    tokens = np.zeros(shape, np.int32)
    forward.jitted_last_logits(model, tokens, np.zeros(shape, np.int32)).block_until_ready()
  compile_all = time.perf_counter() - t

  t = time.perf_counter()
  outputs = [forward.jitted_last_logits(model, *b) for b in batches]
  jax.block_until_ready(outputs)
  wall = time.perf_counter() - t

  flops = common.forward_flops(model.config, [len(s) for s in sequences])
  padded_tokens = sum(b[0].size for b in batches)
  real_tokens = sum(len(s) for s in sequences)
  print(f"prompts: {len(prompts)} in {len(batches)} batches of <= {FLAGS.batch_size}, shapes {shapes}")
  print(f"padding overhead: {padded_tokens / real_tokens - 1:.1%} extra tokens")
  print(f"matmul peak (fp32, same process): {peak / 1e9:.1f} GFLOP/s")
  print(f"first call (compile + run, one shape): {first_call:.2f} s; warming the other shapes: {compile_all:.2f} s")
  print(f"steady state: {wall:.2f} s, {len(prompts) / wall:.1f} prompts/s")
  print(f"MFU: {flops / wall / peak:.1%} ({flops / wall / 1e9:.1f} GFLOP/s useful)")
  print(f"peak RSS: {common.peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
  app.run(main)
