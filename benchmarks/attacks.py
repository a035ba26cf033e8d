"""Cost of each robustness attack's training against the edit's, in one process.

  python -m benchmarks.attacks                  # every attacker at the default config
  python -m benchmarks.attacks --steps=3 --attackers=relearn_lora,softprompt_prefix
  python -m benchmarks.attacks --block_scan=true,false   # scanned blocks vs block by block
  python -m benchmarks.attacks --edit_budget=reference,short   # an edit row at each budget

Each attacker is built by the library's own constructors at the main job's default
settings (`RobustnessConfig()`): LoRA relearning (r = 512, capped by the layer width)
and full-rank relearning (every block weight) on 8 forget facts (true answers) + 8
maintain facts + 8 retain windows per step; the prefix soft prompt and the embedding
adapter on 8 forget facts per step. The reference row is the edit itself (the
fact-lookup mask of sports first-16, MLP 3): at the main job's budget, the reference's
(50 steps of 64 per term in 4 accumulated micro-batches), the budget the robustness
issue's "the suite costs no more than the edit" refers to, or, with
`--edit_budget=short`, at the short budget (30 steps of 16, `configs/common.py:
use_short_budget`). Facts are sports
athletes in the standard one-shot prompt; retain windows are random tokens (the step's
cost does not depend on the text). The pools have the main job's sizes where they bound
a batch (16 forget facts, so the forget term draws 16 per step as in the main job; 64
maintain facts and the default config's 64 training windows of 32 tokens, so the
reference budget's maintain and retain terms draw their full 64); the table prints the
rows each step draws per term.

Per attacker: compile time, step time (median of --steps, wall and process CPU),
XLA's FLOPs of the compiled step (times the micro-batches of an accumulating step),
XLA's memory of the compiled step (its scratch, `temp`, and its inputs, `args`: the
train state, the frozen weights and the batch),
MFU (XLA FLOPs per CPU-second of the step over an fp32 matmul's, timed in this
process, so a background load does not distort it),
and the training cost of the whole attack at its configured steps and number of
seeded attacks, as a multiple of the edit's. Evaluations between steps (relearning
curves, soft-prompt scores) are not included: they are forward passes, priced by
`benchmarks.forward`.

With `--block_scan=true,false` every row runs with the blocks scanned
(`models.transformer.BlockStack`, the default) and block by block, and a last table
gives the ratios (block by block / scanned) of trace + lower time (what a run pays
even when the persistent compilation cache holds the executable), trace + compile
time and step time.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import edit as edit_bench
from configs import common
from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.batch import make_fact_batch
from mech_unlearn_jax.data.facts import load_sports_facts
from mech_unlearn_jax.evals import relearn as relearn_lib
from mech_unlearn_jax.evals import softprompt as softprompt_lib
from mech_unlearn_jax.experiment.robustness import RobustnessConfig
from mech_unlearn_jax.experiment.spec import ExperimentSpec
from mech_unlearn_jax.localize import masks as masks_lib
from mech_unlearn_jax.models import loaders, transformer
from mech_unlearn_jax.train import soft_prompt as sp
from mech_unlearn_jax.train.loop import can_share_prefix

ATTACKERS = ("edit", "relearn_lora", "relearn_full", "softprompt_prefix", "softprompt_adapter")
_ATTACKERS = flags.DEFINE_list("attackers", list(ATTACKERS), f"Which rows (of {ATTACKERS}); 'edit' is the reference.")
_BENCH_STEPS = flags.DEFINE_integer("timed_steps", 3, "Timed steps after the compile step.")
_BLOCK_SCAN = flags.DEFINE_list("block_scan", ["true"], "Run every row with each of these BlockStack.scan settings.")
_EDIT_BUDGETS = flags.DEFINE_list(
    "edit_budget", ["reference"],
    "The edit row's budgets (one row each, `configs/common.py: TUNED_EDIT`): the main job's, the reference's"
    " 50 x 64 ('reference'), and/or the short 30 x 16 ('short', `:short_budget`).",
)
NUM_FORGET = 16  # the main job's forget set (sports, 16 athletes): its forget term draws 16 per step


def pool_sizes() -> tuple[int, int, int]:
  """(maintain facts, retain windows, tokens per window) of the main job's default
  config: pools at least as large as its largest batches, so no row's batch is clamped
  to a smaller pool than the main job's (its maintain pool has hundreds of facts)."""
  spec = ExperimentSpec.from_dict(common.base_config().to_dict())
  maintain = max(edit_row_config(b).maintain_batch_size for b in common.TUNED_EDIT)
  return maintain, spec.retain.num_windows - spec.retain.heldout_windows, spec.retain.window


def sports_pools(tokenizer, vocab_size: int):
  """(edit facts toward their targets, true-answer facts, maintain facts, retain windows)."""
  num_maintain, num_retain, retain_window = pool_sizes()
  facts = [x for x in load_sports_facts() if x.inject_sport_without_golf][: NUM_FORGET + num_maintain]
  prompt = edit_bench.PROMPT

  def batch(rows, answer):
    return make_fact_batch(
        tokenizer, [prompt.format(x.athlete) for x in rows], [x.athlete for x in rows],
        [tokenizer.single_token_id(" " + answer(x)) for x in rows], pad_id=tokenizer.pad_id or 0,
    )

  edit = batch(facts[:NUM_FORGET], lambda x: x.inject_sport_without_golf)
  true = batch(facts[:NUM_FORGET], lambda x: x.sport)
  maintain = batch(facts[NUM_FORGET:], lambda x: x.sport)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, vocab_size, (num_retain, retain_window)).astype(np.int32)
  tokens[:, 0] = tokenizer.bos_id
  retain = train_lib.TextBatch(tokens, np.tile(np.arange(retain_window, dtype=np.int32), (num_retain, 1)))
  return edit, true, maintain, retain


def setup(name: str, model, pools, robust: RobustnessConfig, edit_config):
  """((params, trainable, update_mask), data, config, seeded attacks) of one row."""
  edit_facts, true_facts, maintain, retain = pools
  if name == "edit":
    mask = masks_lib.mask_from_units(model, [masks_lib.Unit(3, "mlp")])
    return train_lib.mask_trainable(model, mask), train_lib.EditData(edit_facts, maintain, retain), edit_config, 1
  if name.startswith("relearn"):
    attacker = robust.relearn_lora if name == "relearn_lora" else robust.relearn_full
    built = relearn_lib.attack_trainable(model, attacker, seed=0)
    return built, train_lib.EditData(true_facts, maintain, retain), attacker.training, 1  # 8 per step
  attack = robust.softprompt_prefix if name == "softprompt_prefix" else robust.softprompt_adapter
  max_norm = attack.norm_scale * sp.median_embedding_norm(model, seed=attack.seed)
  built = softprompt_lib.make_attack_trainable(model, attack, max_norm, seed=0)
  return built, train_lib.EditData(forget=true_facts), attack.training, attack.num_attacks


def edit_row_config(budget: str) -> train_lib.EditConfig:
  """The edit row's optimizer settings at a budget of `configs/common.py: TUNED_EDIT`."""
  c = common.base_config()
  if budget == "short":
    common.use_short_budget(c)
  return ExperimentSpec.from_dict(c.to_dict()).edit


def step_inputs(params, trainable, update_mask, data, config):
  """(fresh train state, step-0 batch, rng, the step's other arguments) as `train` builds them."""
  loss_fn = train_lib.EditLoss(config)
  share = can_share_prefix(loss_fn, trainable, params)
  batch = train_lib.make_batch_fn(data, config, share_prefix=share)(0)
  state = jax.device_put(train_lib.init_state(jax.tree.map(np.array, params), config), jax.devices()[0])
  kwargs = dict(trainable=trainable, update_mask=update_mask, loss_fn=loss_fn, config=config)
  return state, batch, jax.random.key(0), kwargs


def time_training(params, trainable, update_mask, data, config, timed_steps: int, peak_cpu: float) -> dict:
  """Compile + timed steps of `train_step` as `train_lib.train` would run it."""
  state, batch, rng, kwargs = step_inputs(params, trainable, update_mask, data, config)
  t = time.perf_counter()
  lowered = train_lib.train_step.lower(state, batch, rng, **kwargs)
  trace_s = time.perf_counter() - t
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  # Micro-batches accumulate in a `lax.scan`, whose body XLA's cost analysis counts
  # once: the step does num_microbatches times that (the optimizer update, outside the
  # loop, is a rounding error next to the forward and backward passes).
  flops *= config.num_microbatches
  # What the step holds besides its inputs (activations, logits, gradients, optimizer
  # temporaries): independent of the machine's load, unlike the times.
  memory = compiled.memory_analysis()
  temp_mib = memory.temp_size_in_bytes / 2**20 if memory is not None else float("nan")
  args_mib = memory.argument_size_in_bytes / 2**20 if memory is not None else float("nan")
  # Rows the step draws per term (batch sizes clamped to the pools, as in a run).
  rows = {
      name: int(np.prod(np.shape(jax.tree.leaves(getattr(batch, name))[0])[:2]))
      for name in ("forget", "maintain", "retain") if getattr(batch, name) is not None
  }
  walls, cpus = [], []
  state, metrics = compiled(state, batch, rng, trainable=trainable, update_mask=update_mask)
  jax.block_until_ready(metrics)
  for _ in range(timed_steps):
    t, c = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch, rng, trainable=trainable, update_mask=update_mask)
    jax.block_until_ready((state, metrics))
    walls.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)
  cpu = statistics.median(cpus)
  return {
      "trained_params": train_lib.count_parameters(params), "trace_s": trace_s, "compile_s": compile_s,
      "step_s": statistics.median(walls), "step_cpu_s": cpu, "xla_gflop": flops / 1e9,
      "mfu_cpu_time": flops / cpu / peak_cpu, "temp_mib": temp_mib, "args_mib": args_mib, "rows": rows,
  }


def main(argv):
  del argv
  unknown = [a for a in _ATTACKERS.value if a not in ATTACKERS]
  if unknown:
    raise app.UsageError(f"--attackers: unknown {unknown}; expected some of {ATTACKERS}")
  budgets = _EDIT_BUDGETS.value
  unknown = [b for b in budgets if b not in common.TUNED_EDIT]
  if unknown or not budgets:
    raise app.UsageError(f"--edit_budget: expected some of {tuple(common.TUNED_EDIT)}, got {budgets}")
  scans = [_parse_bool(v) for v in _BLOCK_SCAN.value]
  _, peak_cpu = edit_bench.matmul_peak()
  loaded, tokenizer = loaders.load_model_and_tokenizer("default")
  edit_facts, true_facts, maintain, retain = sports_pools(tokenizer, loaded.config.vocab_size)
  robust = RobustnessConfig()
  # (row name, attacker, edit budget or None)
  plan = []
  for name in _ATTACKERS.value:
    if name != "edit":
      plan.append((name, name, None))
    else:
      plan += [("edit" if len(budgets) == 1 else f"edit ({b} budget)", "edit", b) for b in budgets]
  rows = {}
  edit_rows = []
  for (row_name, name, budget), scan in [(p, s) for p in plan for s in scans]:
    model = transformer.with_block_scan(loaded, scan)
    edit_config = edit_row_config(budget or "reference")
    built, data, config, repeats = setup(name, model, (edit_facts, true_facts, maintain, retain), robust, edit_config)
    params, trainable, update_mask = built
    row = time_training(params, trainable, update_mask, data, config, _BENCH_STEPS.value, peak_cpu)
    row.update(steps=config.steps, attacks=repeats, microbatches=config.num_microbatches)
    # Training cost of the whole attack: every seeded attack reuses the compiled step.
    row["training_s"] = row["compile_s"] + repeats * config.steps * row["step_s"]
    row["training_cpu_s"] = repeats * config.steps * row["step_cpu_s"]
    row_name = row_name if len(scans) == 1 else f"{row_name} ({'scanned' if scan else 'block by block'})"
    rows[row_name] = row
    if name == "edit":
      edit_rows.append(row_name)
    print(f"{row_name}: {row}", flush=True)
  print(f"\nfp32 matmul peak: {peak_cpu / 1e9:.1f} GFLOP per CPU-second (this process)")
  for name in edit_rows:
    r = rows[name]
    print(f"{name}: {r['steps']} steps in {r['microbatches']} micro-batch(es)")
  header = ("attacker", "trained", "rows per step (forget / maintain / retain)", "steps x attacks", "compile s", "step s", "step CPU s", "XLA GFLOP", "MFU (CPU)",
            "training CPU s", "vs edit", "XLA temp MiB", "args MiB")
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  edit_cpu = rows[edit_rows[0]]["training_cpu_s"] if edit_rows else None
  for name, r in rows.items():
    ratio = f"{r['training_cpu_s'] / edit_cpu:.2f}x" if edit_cpu else "-"
    drawn = " / ".join(str(r["rows"].get(t, "-")) for t in ("forget", "maintain", "retain"))
    print(f"| {name} | {r['trained_params']:,} | {drawn} | {r['steps']} x {r['attacks']} | {r['compile_s']:.1f} | {r['step_s']:.2f} |"
          f" {r['step_cpu_s']:.2f} | {r['xla_gflop']:.1f} | {r['mfu_cpu_time']:.0%} | {r['training_cpu_s']:.0f} | {ratio} |"
          f" {r['temp_mib']:.0f} | {r['args_mib']:.0f} |")
  if edit_rows and len(rows) > len(edit_rows) and len(scans) == 1:
    attacks = sum(r["training_cpu_s"] for n, r in rows.items() if n not in edit_rows)
    for name in edit_rows:
      print(f"all attacks' training / {name}'s (CPU time): {attacks / rows[name]['training_cpu_s']:.2f}x")
  if set(scans) == {True, False}:
    print("\n| attacker | trace + lower: block by block / scanned | trace + compile | step |\n|---|---|---|---|")
    for name, _, _ in plan:
      a, b = rows[f"{name} (block by block)"], rows[f"{name} (scanned)"]
      print(f"| {name} | {a['trace_s'] / b['trace_s']:.2f}x ({a['trace_s']:.1f} / {b['trace_s']:.1f} s) |"
            f" {a['compile_s'] / b['compile_s']:.2f}x ({a['compile_s']:.1f} / {b['compile_s']:.1f} s) |"
            f" {a['step_s'] / b['step_s']:.2f}x ({a['step_s']:.2f} / {b['step_s']:.2f} s) |")


def _parse_bool(value: str) -> bool:
  if value.lower() not in ("true", "false"):
    raise app.UsageError(f"--block_scan: expected true or false, got {value!r}")
  return value.lower() == "true"


if __name__ == "__main__":
  app.run(main)
