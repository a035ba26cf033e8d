"""Per-device memory of an edit step for bigger models, from shapes alone.

  python -m benchmarks.costs
  python -m benchmarks.costs --xla_check=gemma3-270m --xla_batch=8

Prints markdown tables (the ones in docs/costs.md): per-device bytes of weights,
gradients, AdamW state, activations and the largest gathered weight for each model,
mask (fact lookup vs nonlocalized) and mesh size (FSDP over "data"), then the
smallest mesh that fits 16 GB / 80 GB GPUs and TPU v5e chips with 10% headroom.
Nothing is allocated: shapes come from `jax.eval_shape` (`mech_unlearn_jax.costs`).

`--xla_check=MODEL` also lowers and compiles the real `train.step.train_step` for that
preset on abstract inputs (still nothing allocated) at a batch of `--xla_batch`
examples per term and prints XLA's buffer sizes next to the analytic estimate for the
same batch, to show how far the activation formula is from a compiler's buffer
assignment (on this backend).
"""

from __future__ import annotations

import jax
from absl import app, flags

from mech_unlearn_jax import costs
from mech_unlearn_jax.models import config as config_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(costs.COST_MODELS), "Presets to cost.")
flags.DEFINE_list("mesh_sizes", ["1", "8", "64"], "Mesh sizes (devices on 'data') of the bytes table.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Activation dtype.")
flags.DEFINE_string("xla_check", None, "Preset whose real train step XLA compiles abstractly.")
flags.DEFINE_integer("xla_batch", 8, "Examples per loss term in the XLA check.")
flags.DEFINE_enum("xla_mask", "fact_lookup", ["fact_lookup", "nonlocalized"], "Mask of the XLA check.")
flags.DEFINE_integer("xla_microbatches", 1, "Gradient accumulation in the XLA check.")


def _gb(n: int) -> str:
  return f"{n / costs.GIB:.2f}"


def bytes_table(rows: list[costs.CostRow]) -> str:
  """Markdown table of per-device GiB, one line per row."""
  cast = any(r.cast_bytes for r in rows)  # a column only when compute is bfloat16
  lines = [
      "| model | params | mask (layers) | trained | devices | weights | grads | AdamW |"
      " activations | gathered |" + (" cast |" if cast else "") + " **total** |",
      "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cast else "") + "---:|",
  ]
  for r in rows:
    layers = (
        f"{r.trained_layers[0]}-{r.trained_layers[-1]}" if len(r.trained_layers) > 1
        else str(r.trained_layers[0])
    )
    lines.append(
        f"| {r.model} | {r.parameters / 1e9:.3f} B | {r.mask} ({layers}) |"
        f" {r.trainable_parameters / 1e6:,.1f} M | {r.num_devices} | {_gb(r.weight_bytes)} |"
        f" {_gb(r.gradient_bytes)} | {_gb(r.optimizer_bytes)} | {_gb(r.activation_bytes)} |"
        f" {_gb(r.gathered_bytes)} |" + (f" {_gb(r.cast_bytes)} |" if cast else "")
        + f" **{_gb(r.total_bytes)}** |"
    )
  return "\n".join(lines)


def _fit_cell(fit, accumulate: bool) -> str:
  if fit is None:
    return "> 64"
  n, m = fit
  return f"{n} (x{m})" if accumulate else str(n)


def fit_table(rows: list[dict[str, object]], accumulate: bool = False) -> str:
  """Markdown table of the smallest fitting mesh per accelerator."""
  accelerators = list(costs.ACCELERATORS)
  lines = [
      "| model | mask | " + " | ".join(accelerators) + " |",
      "|---|---|" + "---:|" * len(accelerators),
  ]
  for r in rows:
    cells = [_fit_cell(r[a], accumulate) for a in accelerators]
    lines.append(f"| {r['model']} | {r['mask']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def xla_check(name: str, kind: costs.MaskKind, batch: int, workload: costs.EditWorkload) -> str:
  """XLA's buffer sizes for the real train step (abstract inputs) vs the estimate."""
  small = costs.EditWorkload(
      forget_batch=batch, maintain_batch=batch, retain_batch=batch,
      fact_prompt_tokens=workload.fact_prompt_tokens, retain_tokens=workload.retain_tokens,
      compute_dtype=workload.compute_dtype, num_microbatches=workload.num_microbatches,
  )
  mem = costs.compiled_step_memory(config_lib.get_preset(name), kind, small)
  row = costs.cost_row(name, kind, 1, small)
  layers = row.trained_layers
  trained = row.gradient_bytes
  # Temporaries hold the activations, the gradients (twice when accumulating) and
  # (bfloat16) the cast weights.
  grads = trained * (2 if small.num_microbatches > 1 else 1)
  estimate = row.activation_bytes + grads + row.cast_bytes
  mib = lambda n: f"{n / 2**20:,.0f} MiB"
  return "\n".join([
      f"XLA check ({jax.default_backend()}): {name}, {kind} mask (layers {layers[0]}-{layers[-1]}),"
      f" {batch} examples per term, {small.num_microbatches} micro-batch(es), one device",
      f"  XLA: arguments {mib(mem.argument_size_in_bytes)}, outputs {mib(mem.output_size_in_bytes)},"
      f" aliased {mib(mem.alias_size_in_bytes)}, temporaries {mib(mem.temp_size_in_bytes)}",
      f"  estimate: activations {mib(row.activation_bytes)} + gradients {mib(grads)}"
      f" + cast weights {mib(row.cast_bytes)}"
      f" = {mib(estimate)} (XLA temporaries / estimate = {mem.temp_size_in_bytes / estimate:.2f})",
      f"  estimate of the arguments: weights {mib(row.weight_bytes)} + AdamW {mib(row.optimizer_bytes)}"
      f" = {mib(row.weight_bytes + row.optimizer_bytes)}",
  ])


def main(argv):
  del argv
  sizes = [int(n) for n in FLAGS.mesh_sizes]
  workload = costs.EditWorkload(compute_dtype=FLAGS.compute_dtype)
  print(f"## Per-device GiB of one edit step ({FLAGS.compute_dtype} activations, FSDP over 'data')\n")
  print(bytes_table(costs.cost_rows(FLAGS.models, mesh_sizes=sizes, workload=workload)))
  print("\n## Smallest mesh that fits, 10% headroom (whole batch in one pass)\n")
  print(fit_table(costs.fit_rows(FLAGS.models, workload=workload)))
  print("\n## Smallest mesh that fits with gradient accumulation: devices (x micro-batches)\n")
  print(fit_table(costs.fit_rows(FLAGS.models, workload=workload, accumulate=True), accumulate=True))
  if FLAGS.xla_check:
    print()
    check = costs.EditWorkload(compute_dtype=FLAGS.compute_dtype, num_microbatches=FLAGS.xla_microbatches)
    print(xla_check(FLAGS.xla_check, FLAGS.xla_mask, FLAGS.xla_batch, check))


if __name__ == "__main__":
  app.run(main)
