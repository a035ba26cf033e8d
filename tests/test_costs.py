"""Costs from shapes: parameter counts, FSDP sharding, optimizer state, activations."""

import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from penzai import pz

from mech_unlearn_jax import costs
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import transformer
from mech_unlearn_jax.train import step as step_lib

G270 = config_lib.get_preset("gemma3-270m")
TINY = config_lib.get_preset("tiny-gemma3")


def _eval_shape_count(cfg):
  _, params = jax.eval_shape(
      lambda: pz.unbind_params(transformer.build_transformer(cfg, jax.random.key(0)), freeze=True)
  )
  return sum(math.prod(p.value.named_shape.values()) for p in params)


def test_weight_bytes_of_270m_match_eval_shape_parameter_count():
  assert _eval_shape_count(G270) == 268_098_176
  assert costs.parameter_count(G270) == 268_098_176
  assert costs.weight_bytes_per_device(G270, 1) == 4 * 268_098_176
  assert costs.cost_row("gemma3-270m", "fact_lookup", 1).weight_bytes == 4 * 268_098_176


def test_llama3_8b_preset_has_the_published_parameter_count():
  assert costs.parameter_count(config_lib.get_preset("llama3-8b")) == 8_030_261_248


@pytest.mark.parametrize("n", [2, 8, 64, 256])
def test_sharded_leaves_cost_one_nth_replicated_leaves_cost_all(n):
  shapes = costs.parameter_shapes(G270)
  mesh = costs.data_mesh(n)
  specs = costs.fsdp_specs(shapes, mesh)
  sharded = replicated = 0
  for label, named in shapes.items():
    full = math.prod(named.values()) * 4
    local = costs.shard_bytes(tuple(named.values()), 4, specs[label], mesh)
    # jax's own shard shape for the same NamedSharding agrees.
    jax_local = math.prod(NamedSharding(mesh, specs[label]).shard_shape(tuple(named.values()))) * 4
    assert local == jax_local
    if any(axis is not None for axis in tuple(specs[label])):
      assert local * n == full, label  # exact: partition_spec only shards divisible axes
      sharded += full
    else:
      assert local == full, label
      replicated += full
  # No rounding beyond replication: per-device total = sharded / n + replicated.
  assert costs.weight_bytes_per_device(G270, n) * n == sharded + replicated * n
  if n <= 64:  # every axis of 270M has a factor 64 (d = 640, vocab = 2^18)
    assert replicated == 0
  else:  # the 640-wide norm scales (4 per layer + final) do not divide 256: only those
    assert replicated == 4 * 640 * (4 * G270.num_layers + 1)


def test_fsdp_spec_shards_first_divisible_axis():
  spec = costs.fsdp_specs({"w": {"neurons": 6, "embedding": 8}}, costs.data_mesh(4))["w"]
  assert tuple(spec) == (None, "data")  # 6 % 4 != 0, so the second axis carries "data"


@pytest.mark.parametrize("kind", ["fact_lookup", "nonlocalized"])
@pytest.mark.parametrize("n", [1, 8])
def test_optimizer_bytes_are_two_float32_moments_of_the_masked_weights(kind, n):
  labels, _ = costs.mask_labels(G270, kind)
  shapes = costs.parameter_shapes(G270)
  masked = sum(math.prod(shapes[label].values()) for label in labels)
  trainable = {label: jax.ShapeDtypeStruct(tuple(shapes[label].values()), jnp.float32) for label in labels}
  state = jax.eval_shape(step_lib.make_optimizer(step_lib.EditConfig()).init, trainable)
  scalars = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim == 0)
  assert scalars <= 16  # Adam's step count(s), replicated
  got = costs.optimizer_bytes_per_device(G270, labels, n)
  assert got == 2 * 4 * masked // n + scalars
  assert costs.cost_row("gemma3-270m", kind, n).optimizer_bytes == got


def test_fact_lookup_mask_is_early_mlps_only():
  labels, layers = costs.mask_labels(G270, "fact_lookup")
  assert layers == (3, 4, 5)  # 18 layers: k = 3, layers [k, 2k)
  assert all("/mlp/" in label for label in labels) and len(labels) == 9
  labels, layers = costs.mask_labels(G270, "nonlocalized")
  assert layers == tuple(range(18)) and len(labels) == 7 * 18
  with pytest.raises(ValueError, match="mask kind"):
    costs.mask_labels(G270, "everything")


def test_activation_formula_counts_retain_logits_and_saved_layers():
  w = costs.EditWorkload()
  v = G270.vocab_size
  retain_only = costs.EditWorkload(forget_batch=0, maintain_batch=0)
  no_layers = costs.activation_elements(G270, retain_only, first_trained_layer=G270.num_layers)
  # With no layer saved, what is left: final norm in/out and logits + cotangent.
  assert no_layers == 64 * (100 * 2 * G270.embedding_dim + 2 * 100 * v)
  one_layer = costs.activation_elements(G270, retain_only, first_trained_layer=G270.num_layers - 1)
  assert one_layer - no_layers == 64 * 100 * costs.layer_activation_elements(G270, 100)
  # Frozen layers below the first trained one save nothing.
  assert costs.activation_elements(G270, w, 3) < costs.activation_elements(G270, w, 0)


def test_activations_shard_by_batch_while_it_divides():
  w = costs.EditWorkload()
  one = costs.activation_bytes_per_device(G270, w, 0, 1)
  assert costs.activation_bytes_per_device(G270, w, 0, 8) * 8 == one
  assert costs.activation_bytes_per_device(G270, w, 0, 64) * 64 == one
  assert costs.activation_bytes_per_device(G270, w, 0, 128) == one  # 64 % 128: replicated
  micro = costs.EditWorkload(num_microbatches=4)
  assert costs.activation_bytes_per_device(G270, micro, 0, 8) * 32 == one


def test_gathered_weight_is_zero_on_one_device_and_the_table_otherwise():
  assert costs.gathered_bytes(G270, 1) == 0
  assert costs.gathered_bytes(G270, 8) == 4 * G270.vocab_size * G270.embedding_dim


def test_smallest_mesh_search():
  assert costs.smallest_mesh("gemma3-270m", "fact_lookup", 1 << 50) == (1, 1)
  assert costs.smallest_mesh("gemma3-270m", "fact_lookup", 1 << 20) is None
  row8 = costs.cost_row("gemma3-270m", "nonlocalized", 8)
  row4 = costs.cost_row("gemma3-270m", "nonlocalized", 4)
  assert row4.total_bytes > row8.total_bytes
  capacity = math.ceil(row8.total_bytes / 0.9)
  assert costs.smallest_mesh("gemma3-270m", "nonlocalized", capacity) == (8, 1)
  n, m = costs.smallest_mesh("gemma3-270m", "nonlocalized", capacity, accumulate=True)
  assert n * m <= 64 and (n, m) != (8, 1) and n <= 8


@pytest.mark.parametrize("microbatches", [1, 2])
def test_estimate_tracks_xla_buffers_of_the_real_train_step(microbatches):
  """The compiled step's temporaries stay within 25% of activations + gradients."""
  cfg = TINY.replace(vocab_size=4096, embedding_dim=64, mlp_hidden_dim=256)
  w = costs.EditWorkload(forget_batch=16, maintain_batch=16, retain_batch=16,
                         fact_prompt_tokens=12, retain_tokens=32, num_microbatches=microbatches)
  mem = costs.compiled_step_memory(cfg, "nonlocalized", w)
  row = costs.cost_row("tiny", "nonlocalized", 1, w, config=cfg)
  assert mem.argument_size_in_bytes == pytest.approx(row.weight_bytes + row.optimizer_bytes, rel=0.01)
  # Accumulating keeps the micro-batch's gradient next to the running sum.
  estimate = row.activation_bytes + row.gradient_bytes * (2 if microbatches > 1 else 1)
  assert 0.75 < mem.temp_size_in_bytes / estimate < 1.25
