"""Where the forward and the edit step spend their time, per XLA op (jax.profiler).

  python -m benchmarks.profile --workload=forward     # one knowledge-scan chunk
  python -m benchmarks.profile --workload=step        # one edit step (MLPs 2-7)
  python -m benchmarks.profile --workload=step --case=blocks --top=30

Compiles the workload, runs it once, then `--runs` times under `jax.profiler.trace`.
The CPU trace has one event per executed HLO op (thunk), named by the op; the
compiled HLO text says what each op is. Ops are grouped into kinds (a fusion is
classified by the ops inside it: a fused dot is "matmul", a fused gather "gather",
...) and printed as shares of the profiled time, with the largest ops and their
result shapes. Shares are robust to a background load in a way absolute times are
not; the total is printed for scale only.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from penzai import pz

from benchmarks import edit as edit_bench
from mech_unlearn_jax import batch as batch_lib
from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.data.tasks import get_task
from mech_unlearn_jax.evals import scoring
from mech_unlearn_jax.experiment.spec import ExperimentSpec
from mech_unlearn_jax.models import loaders
from mech_unlearn_jax.train import step as step_lib

_WORKLOAD = flags.DEFINE_enum("workload", "forward", ["forward", "step"], "What to profile.")
_CASE = flags.DEFINE_enum("profile_case", "mlps", ["mlps", "blocks"], "Trainable case of --workload=step.")
_RUNS = flags.DEFINE_integer("runs", 3, "Profiled calls.")
_TOP = flags.DEFINE_integer("top", 20, "Largest ops to list.")
_CHUNK = flags.DEFINE_integer("chunk", 64, "Prompts in the forward chunk.")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\s*\{[^}]*\})?)\s+([\w\-]+)\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body)=%?([\w.\-]+)")
# Kinds by the ops a fusion contains, most telling first.
_KIND_OF_OP = (
    ("matmul", ("dot", "convolution")),
    ("gather/scatter", ("gather", "scatter", "dynamic-slice", "dynamic-update-slice")),
    ("reduce", ("reduce", "reduce-window")),
    ("sort", ("sort",)),
    ("transpose/copy", ("transpose", "copy")),
)


def parse_hlo(text: str) -> dict[str, dict]:
  """Instruction name -> {"opcode", "shape", "ops" (opcodes inside, for fusions)}."""
  computations: dict[str, list[str]] = collections.defaultdict(list)
  instructions: dict[str, dict] = {}
  current = None
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      name, shape, opcode = m.groups()
      instructions[name] = {"opcode": opcode, "shape": shape.split("{")[0], "calls": _CALLS.findall(line)}
      if current is not None:
        computations[current].append(opcode)
      continue
    m = _COMPUTATION.match(line)
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
  for info in instructions.values():
    inner = []
    stack = list(info["calls"])
    while stack:
      comp = stack.pop()
      inner += computations.get(comp, [])
    info["ops"] = inner
  return instructions


def kind_of(info: dict | None, name: str) -> str:
  if info is None:
    # YNNPACK/oneDNN library calls are named for what they run.
    return "matmul" if re.search(r"ynn|onednn|dot|matmul|gemm", name) else "other"
  ops = set(info["ops"]) | {info["opcode"]}
  if info["opcode"] == "custom-call" or "ynn" in name or "onednn" in name:
    return "matmul" if re.search(r"ynn|onednn|dot|matmul", name + info["opcode"]) else "custom-call"
  for kind, opcodes in _KIND_OF_OP:
    if ops & set(opcodes):
      return kind
  return "elementwise" if info["opcode"] == "fusion" else info["opcode"]


def profile(fn, args, runs: int, hlo_text: str) -> tuple[collections.Counter, dict[str, int], float]:
  """(seconds per op name over `runs` calls, calls per op, wall seconds of the calls)."""
  folder = tempfile.mkdtemp(prefix="mech_unlearn_jax_profile_")
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  with jax.profiler.trace(folder):
    for _ in range(runs):
      jax.block_until_ready(fn(*args))
  wall = time.perf_counter() - t
  path = sorted(glob.glob(f"{folder}/plugins/profile/*/*.trace.json.gz"))[-1]
  events = json.load(gzip.open(path))["traceEvents"]
  names = parse_hlo(hlo_text)
  seconds, calls = collections.Counter(), collections.Counter()
  for e in events:
    op = e.get("args", {}).get("hlo_op")
    if e.get("ph") != "X" or op is None or e["name"].startswith("end: "):
      continue
    if op not in names and not re.search(r"ynn|onednn", op):
      continue  # another module (e.g. a host-side helper)
    seconds[op] += e["dur"] / 1e6
    calls[op] += 1
  return seconds, calls, wall


def forward_workload(model, tokenizer):
  """One knowledge-scan chunk as `scoring.score_facts` runs it (shared prefix once)."""
  task = get_task("sports")
  spec = ExperimentSpec()
  facts = task.load(spec.data)[: _CHUNK.value]
  batch = task.fact_batch(tokenizer, task.knowledge_format(spec.data), facts)
  tokens, positions = np.asarray(batch.tokens_BxL), np.asarray(batch.positions_BxL)
  prefix_len = batch_lib.shared_prefix_length(tokens, positions)
  prefix, tokens, positions = batch_lib.split_prefix(tokens, positions, prefix_len)
  unbound, params = pz.unbind_params(model, freeze=True)
  fn = jax.jit(scoring._score_prefixed_chunk_fn)  # pylint: disable=protected-access
  args = (unbound, params, prefix, tokens, positions, np.asarray(batch.candidate_ids_BxC))
  return fn, args, f"{len(facts)} knowledge prompts, shared prefix {prefix_len} tokens"


def step_workload(model, tokenizer, case: str):
  """`benchmarks.edit`'s step (not donating, so every profiled call gets the same state)."""
  forget, retain = edit_bench.workload(tokenizer, model.config.vocab_size)
  forget = batch_lib.share_prefix(forget)
  config = train_lib.EditConfig(
      steps=50, lr=1e-5, forget_batch_size=forget.size, retain_batch_size=retain.tokens_BxL.shape[0]
  )
  batch = train_lib.split_microbatches(train_lib.EditBatch(forget=forget, retain=retain), 1)
  params, trainable, update_mask = train_lib.mask_trainable(model, edit_bench.case_mask(model, case))
  state = jax.device_put(train_lib.init_state(jax.tree.map(np.array, params), config), jax.devices()[0])
  loss_fn = train_lib.EditLoss(config)

  def fn(state, batch, key, trainable, update_mask):
    return step_lib._train_step(  # pylint: disable=protected-access
        state, batch, key, trainable, update_mask, loss_fn=loss_fn, config=config
    )

  return jax.jit(fn), (state, batch, jax.random.key(0), trainable, update_mask), f"edit step, {case} trainable"


def main(argv):
  del argv
  model, tokenizer = loaders.load_model_and_tokenizer("default")
  if _WORKLOAD.value == "forward":
    fn, args, what = forward_workload(model, tokenizer)
  else:
    fn, args, what = step_workload(model, tokenizer, _CASE.value)
  hlo = fn.lower(*args).compile().as_text()
  seconds, calls, wall = profile(fn, args, _RUNS.value, hlo)
  names = parse_hlo(hlo)
  total = sum(seconds.values())
  by_kind = collections.Counter()
  for op, s in seconds.items():
    by_kind[kind_of(names.get(op), op)] += s
  print(f"{what}: {_RUNS.value} calls, {wall / _RUNS.value:.3f} s per call (wall), {total / _RUNS.value:.3f} s of ops per call"
        f" ({len(seconds)} distinct ops)")
  print("by kind (share of op time):")
  for kind, s in by_kind.most_common():
    print(f"  {kind:<16} {s / total:6.1%}  {s / _RUNS.value:8.4f} s/call")
  for kind in ("matmul", "transpose/copy"):
    by_shape = collections.Counter()
    for op, s in seconds.items():
      if kind_of(names.get(op), op) == kind:
        by_shape[(names.get(op) or {"shape": "?"})["shape"]] += s
    print(f"{kind} by result shape (share of op time):")
    for shape, s in by_shape.most_common(8):
      print(f"  {shape:<28} {s / total:6.1%}")
  print(f"largest {_TOP.value} ops:")
  for op, s in seconds.most_common(_TOP.value):
    info = names.get(op) or {"opcode": "?", "shape": "?", "ops": []}
    inner = ",".join(sorted(set(info["ops"]) - {"parameter"}))[:60]
    print(f"  {s / total:6.1%}  {kind_of(names.get(op), op):<14} {op:<28} {info['shape']:<28} {calls[op] // _RUNS.value:>3}x  {inner}")


if __name__ == "__main__":
  app.run(main)
