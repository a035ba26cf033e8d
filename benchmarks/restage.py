"""What a study stage pays for a training step its process has run before.

  python -m benchmarks.restage --rows=relearn_lora,softprompt_prefix

A study runs the same attacks on many models of one architecture (the unedited
control, then every cell's edited model) and drops compiled code between stages
(`compile_cache.release_compiled_code`, against the per-process memory-mapping
limit). Per attacker (built as in `benchmarks.attacks`), in one process with the
persistent compilation cache on in a fresh temporary folder:

  1. cold: trace, lower, compile and run the first step (the cache gets the
     executable);
  2. release with the traces kept (the library's default), rebuild the attacker
     from the model (new objects, same structure and shapes: what the next cell
     does) and time lower + compile + the first step again;
  3. the same after a release that clears every JAX cache (`keep_traces=False`,
     what every stage paid before);
  4. one more step of the compiled step, the steady-state reference.

Reported: seconds of each (split into lowering, compiling or reading the cache, and
the first run), and the overhead over a steady step of 2 and 3.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time

import jax
from absl import app, flags

from benchmarks import attacks as attacks_bench
from mech_unlearn_jax import compile_cache
from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.experiment.robustness import RobustnessConfig
from mech_unlearn_jax.experiment.spec import ExperimentSpec
from mech_unlearn_jax.models import loaders

# Not --rows: importing benchmarks.attacks defines that flag for its own rows.
_ROWS = flags.DEFINE_list(
    "rows", ["relearn_lora", "softprompt_prefix"], f"Attackers to time (of {attacks_bench.ATTACKERS})."
)


def first_step_seconds(built, data, config) -> tuple[float, float, object]:
  """(seconds to lower + compile + run the first step, of which lowering, the compiled step)."""
  params, trainable, update_mask = built
  state, batch, rng, kwargs = attacks_bench.step_inputs(params, trainable, update_mask, data, config)
  t = time.perf_counter()
  lowered = train_lib.train_step.lower(state, batch, rng, **kwargs)
  lower_s = time.perf_counter() - t
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t - lower_s
  out = compiled(state, batch, rng, trainable=trainable, update_mask=update_mask)
  jax.block_until_ready(out)
  seconds = time.perf_counter() - t
  print(f"  lower {lower_s:.1f} s, compile (or cache read) {compile_s:.1f} s,"
        f" first run {seconds - lower_s - compile_s:.1f} s", flush=True)

  def step():
    # A fresh state each time: the step donates its input.
    fresh = attacks_bench.step_inputs(params, trainable, update_mask, data, config)[0]
    t = time.perf_counter()
    jax.block_until_ready(compiled(fresh, batch, rng, trainable=trainable, update_mask=update_mask))
    return time.perf_counter() - t

  return seconds, lower_s, step


def main(argv):
  del argv
  unknown = [a for a in _ROWS.value if a not in attacks_bench.ATTACKERS]
  if unknown:
    raise app.UsageError(f"--rows: unknown {unknown}; expected some of {attacks_bench.ATTACKERS}")
  # A fresh persistent cache, removed at exit (left behind, its entries would skew a
  # later run's timings).
  cache_dir = tempfile.mkdtemp(prefix="restage_cache_")
  atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
  compile_cache.enable(cache_dir)
  model, tokenizer = loaders.load_model_and_tokenizer("default")
  pools = attacks_bench.sports_pools(tokenizer, model.config.vocab_size)
  robust, edit_config = RobustnessConfig(), ExperimentSpec().edit
  rows = []
  for name in _ROWS.value:
    built, data, config, _ = attacks_bench.setup(name, model, pools, robust, edit_config)
    cold, cold_lower, _ = first_step_seconds(built, data, config)
    compile_cache.release_compiled_code(keep_traces=True)
    built, data, config, _ = attacks_bench.setup(name, model, pools, robust, edit_config)
    kept, kept_lower, _ = first_step_seconds(built, data, config)
    compile_cache.release_compiled_code(keep_traces=False)
    built, data, config, _ = attacks_bench.setup(name, model, pools, robust, edit_config)
    cleared, cleared_lower, step = first_step_seconds(built, data, config)
    steady = step()
    row = dict(name=name, cold=cold, cold_lower=cold_lower, kept=kept, kept_lower=kept_lower,
               cleared=cleared, cleared_lower=cleared_lower, steady=steady)
    print(row, flush=True)
    rows.append(row)
    compile_cache.release_compiled_code(keep_traces=False)
  print("\n| attacker | cold first step | after release, traces kept | after release, all cleared | steady step |"
        " overhead kept / cleared |\n|---|---|---|---|---|---|")
  for r in rows:
    over_kept, over_cleared = r["kept"] - r["steady"], r["cleared"] - r["steady"]
    print(f"| {r['name']} | {r['cold']:.1f} s | {r['kept']:.1f} s (lower {r['kept_lower']:.1f}) |"
          f" {r['cleared']:.1f} s (trace + lower {r['cleared_lower']:.1f}) | {r['steady']:.1f} s |"
          f" {over_kept:.1f} / {over_cleared:.1f} s |")


if __name__ == "__main__":
  app.run(main)
