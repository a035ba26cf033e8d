"""Retain-text sampling: KV-cached decoding against a forward over the whole window.

  python -m benchmarks.sampling --num_windows=32 --window=32

The library samples the offline retain text with `interventions.with_kv_cache` (one
column of the model per new token). The reference here is the straightforward way:
a fixed window buffer, one full forward per new token, logits read at the last
filled column. Both run jitted, in the same process, on the same model and keys;
the benchmark prints both wall times (first call and steady state), their ratio,
and whether the two drew the same tokens.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from penzai import pz

from benchmarks import common
from mech_unlearn_jax.data import retain
from mech_unlearn_jax.models import forward, loaders

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_windows", 32, "Windows to sample.")
flags.DEFINE_integer("window", 32, "Tokens per window (BOS included).")
flags.DEFINE_integer("batch_size", 16, "Windows sampled together.")
flags.DEFINE_string("model", "default", "Model spec.")


@partial(jax.jit, static_argnames=("batch", "window"))
def _full_window_sample(unbound, params, bos_id, rng, batch: int, window: int):
  """Reference sampler: every new token runs the model over the whole buffer."""
  model = pz.bind_variables(unbound, params)
  tokens = jnp.zeros((batch, window), jnp.int32).at[:, 0].set(bos_id)
  positions = jnp.full((batch, window), -1, jnp.int32).at[:, 0].set(0)

  def step(i, carry):
    tokens, positions = carry
    logits = forward.logits_at(model, tokens, positions, jnp.full((batch, 1), i))[:, 0]
    nxt = jax.random.categorical(jax.random.fold_in(rng, i), logits.astype(jnp.float32))
    tokens = tokens.at[:, i + 1].set(nxt.astype(tokens.dtype))
    positions = positions.at[:, i + 1].set(i + 1)
    return tokens, positions

  return jax.lax.fori_loop(0, window - 1, step, (tokens, positions))[0]


def _reference(model, bos_id: int, num_windows: int, window: int, seed: int, batch: int) -> np.ndarray:
  unbound, params = pz.unbind_params(model, freeze=True)
  rows = []
  for start in range(0, num_windows, batch):
    rng = jax.random.fold_in(jax.random.key(seed), start)
    out = _full_window_sample(unbound, params, bos_id, rng, batch, window)
    rows.extend(np.asarray(out)[: min(batch, num_windows - start)].tolist())
  return np.asarray(rows)


def _timed(fn):
  t = time.perf_counter()
  first = fn()
  first_s = time.perf_counter() - t
  t = time.perf_counter()
  out = fn()
  return out, first_s, time.perf_counter() - t, first


def main(argv):
  del argv
  model, tokenizer = loaders.load_model_and_tokenizer(FLAGS.model)
  args = (tokenizer.bos_id, FLAGS.num_windows, FLAGS.window)
  cached, cached_first, cached_s, _ = _timed(
      lambda: retain.sample_retain_windows(model, *args, seed=0, batch_size=FLAGS.batch_size)[0]
  )
  full, full_first, full_s, _ = _timed(lambda: _reference(model, *args, seed=0, batch=FLAGS.batch_size))
  same = float(np.mean(cached == full))
  print(f"{FLAGS.num_windows} windows x {FLAGS.window} tokens, batches of {FLAGS.batch_size}")
  print(f"full-window forwards: first call {full_first:.1f} s, steady {full_s:.1f} s")
  print(f"KV cache:             first call {cached_first:.1f} s, steady {cached_s:.1f} s")
  print(f"speedup (steady): {full_s / cached_s:.1f}x; tokens identical: {same:.1%}")
  print(f"peak RSS: {common.peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
  app.run(main)
