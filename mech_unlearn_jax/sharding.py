"""Multi-device placement: named model axes -> mesh axes, in one place.

Runs on many devices with plain `jax.jit` + `Mesh` + `NamedSharding` (no pmap): the
parameters are placed once with `shard_model`, batches with `shard_batch`, and XLA's
SPMD partitioner inserts the collectives. Parameter axes are mapped by *name*, so the
same rules serve every model size:

  "batch"                        -> the data axis
  "vocabulary", "neurons",
  "query_heads", "heads",
  "head_groups"                  -> the model axis (tensor parallelism)
  everything else                -> replicated

An axis is only sharded when its size divides the mesh axis size evenly; otherwise it
is replicated (e.g. Gemma 3 270M's single KV head).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from penzai import pz

DEFAULT_RULES: dict[str, str] = {
    "batch": "data",
    "vocabulary": "model",
    "neurons": "model",
    "query_heads": "model",
    "heads": "model",
    "head_groups": "model",
}


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A 2-D ("data", "model") mesh; `data` defaults to all devices / `model`."""
  devices = list(devices if devices is not None else jax.devices())
  if data is None:
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(f"mesh data={data} x model={model} does not use the {len(devices)} devices")
  return Mesh(np.array(devices).reshape(data, model), ("data", "model"))


def partition_spec(
    named_shape: Mapping[str, int], axis_order: Sequence[str], mesh: Mesh,
    rules: Mapping[str, str] = DEFAULT_RULES,
) -> PartitionSpec:
  """PartitionSpec for an array whose positional axes are `axis_order`."""
  used, spec = set(), []
  for name in axis_order:
    mesh_axis = rules.get(name)
    if (
        mesh_axis in mesh.shape
        and mesh_axis not in used
        and mesh.shape[mesh_axis] > 1
        and named_shape[name] % mesh.shape[mesh_axis] == 0
    ):
      spec.append(mesh_axis)
      used.add(mesh_axis)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def shard_model(model: Any, mesh: Mesh, rules: Mapping[str, str] = DEFAULT_RULES) -> Any:
  """Returns a copy of `model` whose parameters live sharded on `mesh`."""

  def place(param: pz.Parameter) -> pz.Parameter:
    value = param.value
    axes = tuple(value.named_shape)
    array = value.unwrap(*axes)
    sharding = NamedSharding(mesh, partition_spec(value.named_shape, axes, mesh, rules))
    return pz.Parameter(value=pz.nx.wrap(jax.device_put(array, sharding)).tag(*axes), label=param.label)

  unbound, params = pz.unbind_params(model)
  return pz.bind_variables(unbound, [place(p) for p in params])


def shard_batch(arrays: Any, mesh: Mesh) -> Any:
  """Places batch-major arrays with their leading axis on "data" (if it divides)."""

  def place(x):
    x = np.asarray(x)
    data = mesh.shape["data"]
    spec = PartitionSpec("data") if x.ndim and x.shape[0] % data == 0 else PartitionSpec()
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree.map(place, arrays)
