"""Localization benchmark: attribution patching and causal tracing on sports prompts.

  python -m benchmarks.localize --num_prompts=32 --spearman_prompts=16

Prints, for `num_prompts` prompts of the standard sports template on the default
model (the first facts of the embedded athlete list):
  * one jitted forward pass (last-position logits): steady time, first-call time;
  * attribution patching (all q/k/v/head-output/MLP sites of every layer): time in
    forward-pass equivalents (AP time / forward time), first-call time, MFU;
  * causal tracing (every MLP and every head restored, all positions, one noise
    sample): prompt-restorations per second, time in forward-pass equivalents
    (including its clean and corrupted runs), first-call time, MFU;
  * the Spearman rank correlation between AP scores and exact activation patching
    for every MLP output and a seeded sample of heads, on `spearman_prompts` facts
    the model knows (p(true sport) >= 0.5 among the three sports).
MFU = analytic executed FLOPs / wall time / peak, with the peak a large fp32 matmul
timed in the same process. Executed FLOPs count padded columns and the full masked
attention square, i.e. what the kernels actually do; AP's backward pass is counted
as one more forward (activation gradients only: parameters are constants).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from mech_unlearn_jax.data import facts as facts_lib
from mech_unlearn_jax.localize import attribution_patching as ap
from mech_unlearn_jax.localize import causal_tracing as ct
from mech_unlearn_jax.localize import corruption
from mech_unlearn_jax.models import forward, loaders
from mech_unlearn_jax.models.config import TransformerConfig
from mech_unlearn_jax.models.loaders import load_tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "default", "Model spec (see loaders.load_model).")
flags.DEFINE_integer("num_prompts", 32, "Prompts in the timed batch.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (the median is reported).")
flags.DEFINE_integer("ct_samples", 1, "Noise samples per prompt for causal tracing.")
flags.DEFINE_integer("spearman_prompts", 16, "Known facts for the AP-vs-patching correlation (0: skip).")
flags.DEFINE_integer("spearman_heads", 24, "Heads sampled for the correlation (all MLPs are used).")
flags.DEFINE_integer("seed", 0, "Corruption / sampling seed.")
flags.DEFINE_list("methods", ["ap", "ct"], "Which of ap, ct to time.")


def layer_flops(c: TransformerConfig, seqs: float, q_cols: int, kv_cols: int, new_cols: int) -> float:
  """One block: q/o/MLP on q_cols, k/v on new_cols, attention q_cols x kv_cols, per sequence."""
  d, hd, h, kv, f = c.embedding_dim, c.head_dim, c.num_heads, c.num_kv_heads, c.mlp_hidden_dim
  per_seq = (
      2 * q_cols * d * hd * h  # q
      + 4 * new_cols * d * hd * kv  # k, v
      + 4 * q_cols * kv_cols * h * hd  # scores + weighted sum
      + 2 * q_cols * hd * h * d  # o
      + 6 * q_cols * d * f  # gate, up, down
  )
  return seqs * per_seq


def forward_flops(c: TransformerConfig, batch: int, width: int, logits_rows: float) -> float:
  return c.num_layers * layer_flops(c, batch, width, width, width) + 2 * c.embedding_dim * c.vocab_size * logits_rows


def ct_flops(c: TransformerConfig, batch: int, width: int, start: int, samples: int) -> float:
  """Executed FLOPs of `causal_tracing` (all positions, heads and MLPs), mirroring its loop."""
  d, hd, h, kv, f = c.embedding_dim, c.head_dim, c.num_heads, c.num_kv_heads, c.mlp_hidden_dim
  total = forward_flops(c, batch, width, batch)  # clean run
  suffix = width - start
  rows = 1
  for layer in range(c.num_layers):
    q_cols = 1 if layer == c.num_layers - 1 else suffix
    seqs = rows * samples * batch
    total += 4 * batch * start * d * hd * kv  # prefix keys/values from the clean run
    total += seqs * (2 * q_cols * d * hd * h + 4 * suffix * d * hd * kv + 4 * q_cols * width * h * hd)
    total += (rows + h) * samples * batch * q_cols * (2 * hd * h * d + 6 * d * f)
    rows += h + 1
  return total + rows * samples * batch * 2 * d * c.vocab_size


def known_facts(model, tokenizer, candidates, count):
  """The first `count` facts whose true sport gets >= 0.5 of the 3-way probability."""
  batch = common.sports_batch(tokenizer, candidates)
  logits = np.asarray(forward.jitted_last_logits(model, batch.tokens_BxL, batch.positions_BxL))
  cands = batch.candidate_ids_BxC
  picked = np.take_along_axis(logits, cands, 1)
  probs = np.exp(picked - picked.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  keep = [f for f, p in zip(candidates, probs[:, 0]) if p >= 0.5]
  return keep[:count]


def ap_flops(c: TransformerConfig, batch: int, width: int, start: int) -> float:
  """Executed FLOPs of `attribution_patching` with prefix reuse (backward = 1 forward)."""
  suffix = width - start
  prefix = c.num_layers * layer_flops(c, batch, start, start, start)
  return prefix + 3 * c.num_layers * layer_flops(c, batch, suffix, width, suffix)


def time_ap(model, batch, corrupt, fwd, peak):
  def run():
    jax.block_until_ready(ap.attribution_patching(model, batch, corrupt).scores)

  first, steady = common.timed(run, FLAGS.repeats)
  b, width = batch.tokens_BxL.shape
  start = ap.first_differing_column(batch.tokens_BxL, corrupt)
  flops = ap_flops(model.config, b, width, start)
  print(
      f"attribution patching ({len(ap.DEFAULT_KINDS)} site kinds x {model.config.num_layers} layers,"
      f" columns {start}.. run twice + backward): {steady:.3f} s = {steady / fwd:.2f} forward passes"
      f" (target <= 3), first call {first:.1f} s, MFU {flops / steady / peak:.1%}"
  )


def time_ct(model, batch, fwd, peak):
  config = model.config
  ct_config = ct.CTConfig(num_samples=FLAGS.ct_samples)
  first, steady = common.timed(lambda: ct.causal_tracing(model, batch, ct_config), FLAGS.repeats)
  b, width = batch.tokens_BxL.shape
  start = int(np.asarray(batch.subject_mask_BxL).any(0).argmax())
  restorations = config.num_layers * (config.num_heads + 1)
  flops = ct_flops(config, b, width, start, FLAGS.ct_samples)
  print(
      f"causal tracing ({restorations} restorations: {config.num_layers} MLPs +"
      f" {config.num_layers * config.num_heads} heads, {FLAGS.ct_samples} noise sample(s), clean and"
      f" corrupted runs included): {steady:.3f} s, {b * restorations * FLAGS.ct_samples / steady:.1f}"
      f" prompt-restorations/s, {steady / fwd / FLAGS.ct_samples:.1f} forward passes per noise sample"
      f" (target <= 45; naive: {restorations + 2}), first call {first:.1f} s,"
      f" MFU {flops / steady / peak:.1%}"
  )


def spearman_report(model, tokenizer, facts, pool):
  config = model.config
  known = known_facts(model, tokenizer, facts[: 8 * FLAGS.spearman_prompts], FLAGS.spearman_prompts)
  small = common.sports_batch(tokenizer, known)
  small_corrupt = corruption.corrupt_subjects(tokenizer, small, pool, seed=FLAGS.seed)
  t = time.perf_counter()
  report = ap.compare_with_activation_patching(
      model, small, small_corrupt, num_heads_sampled=FLAGS.spearman_heads, seed=FLAGS.seed
  )
  print(
      f"AP vs exact activation patching on {small.size} known facts"
      f" ({config.num_layers} MLP outputs, {FLAGS.spearman_heads} sampled head outputs):"
      f" Spearman MLPs {report['mlp_spearman']:.3f}, heads {report['head_spearman']:.3f},"
      f" all {report['all_spearman']:.3f} ({time.perf_counter() - t:.0f} s)"
  )
  order = np.argsort(report["patching"])[:5]
  top = ", ".join(
      f"{report['components'][i]} {report['patching'][i]:+.3f}/{report['ap'][i]:+.3f}" for i in order
  )
  print(f"  strongest by patching (patching/AP): {top}")


def main(argv):
  del argv
  tokenizer = load_tokenizer(FLAGS.model)
  model = loaders.load_model(FLAGS.model)
  facts = facts_lib.load_sports_facts()
  batch = common.sports_batch(tokenizer, facts[: FLAGS.num_prompts])
  pool = corruption.ascii_token_ids(tokenizer, tokenizer.vocab_size)
  corrupt = corruption.corrupt_subjects(tokenizer, batch, pool, seed=FLAGS.seed)
  b, width = batch.tokens_BxL.shape
  peak = common.matmul_peak_flops()
  print(f"devices: {jax.devices()}")
  print(
      f"batch: {b} prompts x {width} columns (first subject column"
      f" {int(np.asarray(batch.subject_mask_BxL).any(0).argmax())}); peak fp32 matmul {peak / 1e9:.1f} GFLOP/s"
  )
  fwd_first, fwd = common.timed(
      lambda: forward.jitted_last_logits(model, batch.tokens_BxL, batch.positions_BxL).block_until_ready(),
      FLAGS.repeats,
  )
  fwd_flops = forward_flops(model.config, b, width, b)
  print(f"forward: {fwd:.3f} s, first call {fwd_first:.1f} s, MFU {fwd_flops / fwd / peak:.1%}")
  if "ap" in FLAGS.methods:
    time_ap(model, batch, corrupt, fwd, peak)
  if "ct" in FLAGS.methods:
    time_ct(model, batch, fwd, peak)
  if FLAGS.spearman_prompts:
    spearman_report(model, tokenizer, facts, pool)
  print(f"peak RSS: {common.peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
  app.run(main)
