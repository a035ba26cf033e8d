"""Edit-step benchmark on the default model: one AdamW step, localized vs all blocks.

  python -m benchmarks.edit                # both cases, each in its own subprocess
  python -m benchmarks.edit --case=mlps    # one case in this process
  python -m benchmarks.edit --compute_dtypes=float32,bfloat16   # bf16 against fp32, same run
  python -m benchmarks.edit --share_prefixes=false,true          # the shared one-shot prefix, same run

Fixed workload per optimizer step: 32 sports facts in the standard one-shot prompt
(CE toward the edit target at the last token, full vocabulary) plus 8 retain windows
of 46 tokens (next-token CE at every position), AdamW, global-norm clip 1.0. Cases:
  mlps:   the MLPs of layers 2-7 trainable (a fact-lookup-sized edit), run both in
          one batch and with 2 accumulated micro-batches (lower peak memory);
  blocks: every attention and MLP matrix trainable (the "nonlocalized" baseline).
Prints compile time, step time, MFU (analytic forward+backward FLOPs of the work the
mask requires / step time / an fp32 matmul peak timed in the same process), the FLOPs
XLA reports for the compiled step (a scan body is counted once, so with micro-batches
it is per micro-batch), optimizer-state bytes and peak RSS. On a shared machine wall
times are noisy; `mfu_cpu_time` (FLOPs per process-CPU-second of the step over those of
the matmul) is the figure that other processes do not distort. Each case runs
in a fresh subprocess so that peak RSS is per case (freed heap is returned to the OS
after loading and compiling, see `progress.release_free_heap`).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from mech_unlearn_jax import batch as batch_lib
from mech_unlearn_jax import progress
from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.batch import make_fact_batch
from mech_unlearn_jax.models import loaders
from mech_unlearn_jax.models.config import TransformerConfig
from mech_unlearn_jax.models.transformer import parameters_by_label

_CASE = flags.DEFINE_enum("case", None, ["mlps", "blocks"], "Run one case here; default: both in subprocesses.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after the compile step (best is reported).")
_MODEL = flags.DEFINE_string("model", "default", "Model spec for `load_model`.")
_MICRO = flags.DEFINE_integer("microbatches", 1, "Gradient-accumulation micro-batches.")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "EditConfig.compute_dtype of --case.")
_SHARE = flags.DEFINE_bool("share_prefix", True, "Run the facts' shared one-shot prefix once per step (--case).")
_SHARES = flags.DEFINE_list("share_prefixes", ["true"], "Without --case: run every case with each of these.")
_DTYPES = flags.DEFINE_list(
    "compute_dtypes", ["float32"], "Without --case: run every case in each of these compute dtypes (ratios printed)."
)

PROMPT = "Fact: Tiger Woods plays the sport of golf\nFact: {} plays the sport of"
NUM_FACTS, NUM_WINDOWS, WINDOW = 32, 8, 46
_MLP = ("gating_linear", "value_linear", "out_linear")
_ATTN = ("query", "key", "value", "output")


def case_mask(model, case: str) -> dict[str, bool]:
  def trainable(label: str) -> bool:
    parts = label.split("/")
    if len(parts) < 4 or not parts[1].startswith("block_"):
      return False
    layer, group, name = int(parts[1][len("block_"):]), parts[2], parts[3].split(".")[0]
    if case == "mlps":
      return group == "mlp" and name in _MLP and 2 <= layer <= 7
    return (group == "mlp" and name in _MLP) or (group == "attention" and name in _ATTN)

  return {label: trainable(label) for label in parameters_by_label(model)}


def step_flops(config: TransformerConfig, mask: dict[str, bool], fact_lengths, text_lengths) -> float:
  """Analytic FLOPs of forward + the backward the mask requires (useful work).

  Forward: weight matmuls per real token, attention (causal half, window-limited on
  local layers), unembedding at the last token of each fact and at every text
  position. Backward: the unembedding's input gradient; per layer, the input
  gradient of every op above the lowest trainable matrix (attention core x2: both
  operands) and the weight gradient of trainable matrices. Frozen weights below the
  lowest trainable matrix and the frozen embedding get no gradient.
  """
  d, p, f = config.embedding_dim, config.head_dim, config.mlp_hidden_dim
  h, kv = config.num_heads, config.num_kv_heads
  mat = {  # per-token forward FLOPs of each weight matmul
      "query": 2 * d * h * p, "key": 2 * d * kv * p, "value": 2 * d * kv * p,
      "output": 2 * h * p * d, "gating_linear": 2 * d * f, "value_linear": 2 * d * f,
      "out_linear": 2 * f * d,
  }
  # Bottom-to-top order of ops inside a block; "core" is scores + weighted sum.
  order = [("query", "key", "value"), ("core",), ("output",), ("gating_linear", "value_linear"), ("out_linear",)]

  def trained(layer, name):
    group = "attention" if name in _ATTN else "mlp"
    return bool(np.any(mask.get(f"transformer/block_{layer}/{group}/{name}.weights", False)))

  lowest = None  # (layer, position in `order`) of the lowest trainable matrix
  for layer in range(config.num_layers):
    for pos, group in enumerate(order):
      if lowest is None and any(n != "core" and trained(layer, n) for n in group):
        lowest = (layer, pos)
  total = 0.0
  for lengths, logit_rows_per_seq in ((fact_lengths, 1), (text_lengths, None)):
    for n in lengths:
      total += 2 * d * config.vocab_size * (logit_rows_per_seq or n) * (2 if lowest else 1)
      for layer in range(config.num_layers):
        span = n if config.layer_types[layer] == "global" else min(n, config.sliding_window)
        core = 4 * h * p * n * span / 2
        for pos, group in enumerate(order):
          for name in group:
            fwd = core if name == "core" else mat[name] * n
            total += fwd
            if lowest is None:
              continue
            above = (layer, pos) > lowest
            if name == "core":
              total += 2 * fwd if above else 0
            else:
              total += fwd if above else 0  # input gradient
              total += fwd if trained(layer, name) else 0  # weight gradient
  return total


def matmul_peak(n: int = 2048, repeats: int = 10) -> tuple[float, float]:
  """(FLOP per wall second, FLOP per process-CPU second) of a jitted fp32 matmul.

  The CPU-time figure is robust to other processes time-slicing the machine: the
  CPU-time MFU compares FLOPs per CPU-second of the step with those of the matmul.
  """
  a = jax.random.normal(jax.random.key(0), (n, n), np.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), np.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best_wall = best_cpu = float("inf")
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    f(a, b).block_until_ready()
    best_wall = min(best_wall, time.perf_counter() - wall)
    best_cpu = min(best_cpu, time.process_time() - cpu)
  return 2 * n**3 / best_wall, 2 * n**3 / best_cpu


def workload(tokenizer, vocab_size: int) -> tuple[batch_lib.FactBatch, train_lib.TextBatch]:
  """The step's data: 32 facts toward their edit targets, 8 random-token retain windows."""
  from mech_unlearn_jax.data.facts import load_sports_facts  # pylint: disable=g-import-not-at-top

  facts = [x for x in load_sports_facts() if x.inject_sport_without_golf][:NUM_FACTS]
  forget = make_fact_batch(
      tokenizer,
      [PROMPT.format(x.athlete) for x in facts],
      [x.athlete for x in facts],
      [tokenizer.single_token_id(" " + x.inject_sport_without_golf) for x in facts],
      pad_id=tokenizer.pad_id or 0,
  )
  rng = np.random.default_rng(0)
  # Random-token windows: the step's cost does not depend on the text.
  tokens = rng.integers(3, vocab_size, (NUM_WINDOWS, WINDOW)).astype(np.int32)
  tokens[:, 0] = tokenizer.bos_id
  retain = train_lib.TextBatch(tokens, np.tile(np.arange(WINDOW, dtype=np.int32), (NUM_WINDOWS, 1)))
  return forget, retain


def run_case(case: str) -> dict[str, float]:
  from mech_unlearn_jax.models.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  peak, peak_cpu = matmul_peak()
  t = time.perf_counter()
  model = loaders.load_model(_MODEL.value)
  load_s = time.perf_counter() - t
  tokenizer = Tokenizer.from_gguf(loaders.default_gguf_path())
  forget, retain = workload(tokenizer, model.config.vocab_size)
  # Useful work is counted on the whole rows, so a shared prefix shows up as speed.
  fact_lengths = [int((row >= 0).sum()) for row in forget.positions_BxL]
  fact_width = int(forget.tokens_BxL.shape[1])
  if _SHARE.value:
    forget = batch_lib.share_prefix(forget)
  config = train_lib.EditConfig(
      steps=50, lr=1e-5, forget_batch_size=NUM_FACTS, retain_batch_size=NUM_WINDOWS,
      num_microbatches=_MICRO.value, compute_dtype=_DTYPE.value,
  )
  batch = train_lib.split_microbatches(
      train_lib.EditBatch(forget=forget, retain=retain), config.num_microbatches
  )
  mask = case_mask(model, case)
  model_config = model.config
  params, trainable, update_mask = train_lib.mask_trainable(model, mask)
  state = jax.device_put(train_lib.init_state(params, config), jax.devices()[0])
  # The state owns the trained leaves (the model's own buffers: the step donates
  # them, so the model is dead from here); drop the model and the tokenizer so peak
  # RSS reflects what a training process must hold.
  del params, model, tokenizer
  progress.release_free_heap()
  rng_key = jax.random.key(0)
  kwargs = dict(
      trainable=trainable, update_mask=update_mask, loss_fn=train_lib.EditLoss(config), config=config
  )

  t = time.perf_counter()
  lowered = train_lib.train_step.lower(state, batch, rng_key, **kwargs)
  trace_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  progress.release_free_heap()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  # Any op other than a parameter with a [vocab, embedding] or [embedding, vocab]
  # result (an embedding gradient, a transposed copy of the table) shows up here.
  v, d = model_config.vocab_size, model_config.embedding_dim
  table_shapes = (f"f32[{v},{d}]", f"f32[{d},{v}]")
  table_ops = sum(
      1 for line in compiled.as_text().splitlines()
      if " = " in line and line.split(" = ", 1)[1].startswith(table_shapes)
      and not any(op in line for op in ("parameter(", " bitcast(", "get-tuple-element("))
  )

  step = functools.partial(train_lib.train_step, **kwargs)
  t = time.perf_counter()
  state, metrics = step(state, batch, rng_key)
  jax.block_until_ready((state, metrics))
  first_step_s = time.perf_counter() - t
  times, cpu_times = [], []
  for _ in range(_STEPS.value):
    t, c = time.perf_counter(), time.process_time()
    state, metrics = step(state, batch, rng_key)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
    cpu_times.append(time.process_time() - c)
  best = min(times)
  # The machine may be shared: time the peak again and keep the higher one, so the
  # MFU is not flattered by a peak measured while something else was running.
  peak_again, peak_cpu_again = matmul_peak()
  peak, peak_cpu = max(peak, peak_again), max(peak_cpu, peak_cpu_again)
  flops = step_flops(model_config, mask, fact_lengths, [WINDOW] * NUM_WINDOWS)
  return {
      "case": case,
      "compute_dtype": _DTYPE.value,
      "share_prefix": _SHARE.value,
      "microbatches": _MICRO.value,
      "trained_params": int(sum(np.prod(x.shape) for x in state.params.values())),
      "fact_prompt_tokens_padded": fact_width,
      "fact_prompt_tokens_mean": float(np.mean(fact_lengths)),
      "model_load_s": load_s,
      "trace_s": trace_s,
      "compile_s": compile_s,
      "first_step_s": first_step_s,
      "step_s_best": best,
      "step_s_median": float(np.median(times)),
      "analytic_gflop": flops / 1e9,
      "xla_gflop": xla_flops / 1e9,
      "peak_gflops": peak / 1e9,
      "mfu": flops / best / peak,
      "step_cpu_s_best": min(cpu_times),
      "peak_gflop_per_cpu_s": peak_cpu / 1e9,
      "mfu_cpu_time": flops / min(cpu_times) / peak_cpu,
      "mfu_xla_flops": xla_flops / best / peak,
      "opt_state_mb": train_lib.optimizer_state_bytes(state.opt_state) / 2**20,
      "peak_rss_gb": common.peak_rss_bytes() / 2**30,
      "vocab_x_embedding_ops": table_ops,
      "loss": float(metrics["loss"]),
  }


def main(argv):
  del argv
  if _CASE.value:
    print("RESULT " + json.dumps(run_case(_CASE.value)), flush=True)
    return
  results = []
  for dtype in _DTYPES.value:
    for share in _SHARES.value:
      for case, micro in (("mlps", _MICRO.value), ("mlps", 2), ("blocks", _MICRO.value)):
        cmd = [sys.executable, "-m", "benchmarks.edit", f"--case={case}", f"--steps={_STEPS.value}",
               f"--model={_MODEL.value}", f"--microbatches={micro}", f"--compute_dtype={dtype}",
               f"--share_prefix={share}"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=False)
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not lines:
          sys.exit(f"case {case} ({dtype}, share_prefix={share}) failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs")
  keys = list(results[0])
  width = max(len(k) for k in keys)
  for key in keys:
    row = [r[key] for r in results]
    cells = [f"{v:>12.4g}" if isinstance(v, float) else f"{v!s:>12}" for v in row]
    print(f"{key:<{width}} " + " ".join(cells))
  for i in range(0, len(results), 3):
    a, _, b = results[i : i + 3]
    print(f"{a['compute_dtype']}, share_prefix={a['share_prefix']}: mlps/blocks step CPU time"
          f" {a['step_cpu_s_best'] / b['step_cpu_s_best']:.2f}x, optimizer state {a['opt_state_mb'] / b['opt_state_mb']:.3f}x")
  # Same case, one setting changed: the ratio of step CPU times (other processes do
  # not distort CPU time as they do wall time).
  for i, a in enumerate(results):
    for b in results[i + 1 :]:
      same = all(a[k] == b[k] for k in ("case", "microbatches"))
      one_change = (a["compute_dtype"] != b["compute_dtype"]) + (a["share_prefix"] != b["share_prefix"]) == 1
      if same and one_change:
        what = "compute_dtype" if a["compute_dtype"] != b["compute_dtype"] else "share_prefix"
        print(f"{a['case']} x{a['microbatches']}: {what} {a[what]} -> {b[what]}: step CPU time"
              f" {b['step_cpu_s_best'] / a['step_cpu_s_best']:.2f}x, loss {a['loss']:.4f} -> {b['loss']:.4f}")


if __name__ == "__main__":
  app.run(main)
