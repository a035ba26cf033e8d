"""Shared benchmark helpers: a matmul peak timed in-process, FLOP counts, peak RSS, the
sports prompt batch.

Benchmarks report ratios measured in the same run (MFU = analytic FLOPs / wall time /
peak, with the peak timed here), because absolute timings on shared machines are noise.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from mech_unlearn_jax.batch import FactBatch, make_fact_batch
from mech_unlearn_jax.data import formats
from mech_unlearn_jax.models.config import TransformerConfig
from mech_unlearn_jax.progress import peak_rss_bytes  # noqa: F401  (re-exported for the benchmarks)

SPORTS = ("basketball", "baseball", "football")


def sports_batch(tokenizer, facts) -> FactBatch:
  """`facts` in the standard sports prompt, the true sport against the two others."""
  template = formats.SportsTemplateFormat(name="standard").template
  ids = {s: tokenizer.single_token_id(" " + s) for s in SPORTS}
  return make_fact_batch(
      tokenizer,
      [template.replace("{athlete}", f.athlete) for f in facts],
      [f.athlete for f in facts],
      [ids[f.sport] for f in facts],
      [[ids[s] for s in SPORTS if s != f.sport] for f in facts],
  )


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """Best-of-`repeats` FLOP/s of a jitted fp32 [n,n] @ [n,n] matmul."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def forward_flops(config: TransformerConfig, lengths, logits_positions_per_row: int = 1) -> float:
  """Analytic forward FLOPs (multiply-adds x 2) of a batch of prompts of `lengths`.

  Counts the weight matmuls per token, attention scores and weighted sums (full
  causal square for global layers, window-limited for local ones, halved for
  causality) and the unembedding at `logits_positions_per_row` positions per row.
  Padding is not counted: this is useful work.
  """
  d, hd = config.embedding_dim, config.head_dim
  per_token = 2 * (
      d * hd * (2 * config.num_heads + 2 * config.num_kv_heads)  # q, k, v, o
      + 3 * d * config.mlp_hidden_dim
  ) * config.num_layers
  total = 0.0
  for n in lengths:
    total += per_token * n
    for layer in range(config.num_layers):
      span = n if config.layer_types[layer] == "global" else min(n, config.sliding_window)
      # scores + weighted sum: 2 * 2 * heads * hd per (query, key) pair, causal half.
      total += 4 * config.num_heads * hd * n * span / 2
    total += 2 * d * config.vocab_size * logits_positions_per_row
  return total


def timed(fn, repeats):
  """(first-call seconds, median steady seconds) of a function that blocks."""
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  steady = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    steady.append(time.perf_counter() - t)
  return first, statistics.median(steady)
