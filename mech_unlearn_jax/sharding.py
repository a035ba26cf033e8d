"""Multi-device placement: named model axes -> mesh axes, in one place.

Runs on many devices (and hosts) with plain `jax.jit` + `Mesh` + `NamedSharding` (no
pmap): the model is placed once with `shard_model`, batches with `shard_batch`, and
XLA's SPMD partitioner inserts the collectives. The mesh has two axes:

  "data"   data parallelism (batches are split along their example axis) and FSDP
           (each weight is also split along one of its axes, gathered for its use);
  "model"  tensor parallelism (heads, MLP neurons and the vocabulary are split).

A placed model carries its mesh: every heavy call (scoring, attribution patching,
causal tracing, the trainer) reads it back with `mesh_of(model)` and splits its batch
over "data"; a model on one device takes the unchanged single-device path.

Parameter axes are mapped by *name*, so the same rules serve every model size:

  tensor parallel (`DEFAULT_RULES`)   "vocabulary", "neurons", "query_heads", "heads",
                                      "head_groups" -> "model"; "batch" -> "data"
  FSDP (`fsdp=True`)                  then the first remaining axis, in named-shape
                                      order, whose size divides the "data" axis
                                      -> "data"
  everything else                     replicated

An axis is only sharded when its size divides the mesh axis evenly; otherwise it is
replicated (e.g. Gemma 3 270M's single KV head on the "model" axis). With "model" of
size 1 this is exactly the FSDP placement `costs.py` prices.

Multi-host: every process runs the same program on the same host-side data (batches
are pure functions of the seed and step); `put` turns a host array into a global
array of which each process holds its own shards. Outputs that are read on the host
are replicated (small: scores, metrics), so every process can read them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from penzai import pz

DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)

DEFAULT_RULES: dict[str, str] = {
    "batch": DATA,
    "vocabulary": MODEL,
    "neurons": MODEL,
    "query_heads": MODEL,
    "heads": MODEL,
    "head_groups": MODEL,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh of a run (`config.mesh`).

  Attributes:
    data: size of the "data" axis (batches split over it; FSDP shards weights over
      it); -1: every device not used by the other axis.
    model: size of the "model" axis (tensor parallelism over heads, neurons and the
      vocabulary); -1: every device not used by the other axis.
    fsdp: also shard every weight along one axis over "data" (gathered for its use);
      False replicates weights over "data" (plain data parallelism).
  """

  data: int = -1
  model: int = 1
  fsdp: bool = True

  def __post_init__(self):
    for name in ("data", "model"):
      value = getattr(self, name)
      if value != -1 and value < 1:
        raise ValueError(f"MeshConfig.{name} must be -1 (all remaining devices) or >= 1, got {value}")
    if self.data == -1 and self.model == -1:
      raise ValueError("MeshConfig.data and MeshConfig.model cannot both be -1")


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A 2-D ("data", "model") mesh; `data` defaults to all devices / `model`."""
  devices = list(devices if devices is not None else jax.devices())
  if data is None:
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(f"mesh data={data} x model={model} does not use the {len(devices)} devices")
  return Mesh(np.array(devices).reshape(data, model), MESH_AXES)


def mesh_from_config(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  """The ("data", "model") mesh of `config` over `devices` (default: all devices).

  Raises ValueError naming `config.mesh.*` when the sizes do not use the devices.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  data, model = config.data, config.model
  if data == -1 or model == -1:
    fixed_name, fixed = ("model", model) if data == -1 else ("data", data)
    if n % fixed:
      raise ValueError(f"config.mesh.{fixed_name}={fixed} does not divide the {n} devices")
    data, model = (n // model, model) if data == -1 else (data, n // data)
  if data * model != n:
    raise ValueError(
        f"config.mesh.data={config.data} x config.mesh.model={config.model} does not use the"
        f" {n} devices (set one of them to -1)"
    )
  return make_mesh(data, model, devices)


def is_multi_device(mesh: Mesh | None) -> bool:
  """True for a mesh of more than one device (one device: the single-device path)."""
  return mesh is not None and mesh.size > 1


def data_size(mesh: Mesh | None) -> int:
  """Size of the "data" axis (1 without a mesh)."""
  return 1 if mesh is None else int(mesh.shape.get(DATA, 1))


# ----------------------------------------------------------------------------------
# Specs: named axes -> mesh axes.


def partition_spec(
    named_shape: Mapping[str, int], axis_order: Sequence[str], mesh: Any,
    rules: Mapping[str, str] = DEFAULT_RULES,
) -> PartitionSpec:
  """PartitionSpec for an array whose positional axes are `axis_order`.

  Each named axis goes to the mesh axis `rules` names, if that mesh axis is larger
  than 1, not yet used by this array, and divides the axis size. `mesh` may be an
  `AbstractMesh` (shapes only).
  """
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


def param_spec(
    named_shape: Mapping[str, int], axis_order: Sequence[str], mesh: Any,
    rules: Mapping[str, str] = DEFAULT_RULES, fsdp: bool = True,
) -> PartitionSpec:
  """PartitionSpec of a weight: tensor-parallel `rules`, then FSDP over "data".

  FSDP shards the first axis (in `axis_order`) that the rules left unsharded and
  whose size divides the "data" axis, unless "data" is already used.
  """
  spec = list(partition_spec(named_shape, axis_order, mesh, rules))
  size = mesh.shape.get(DATA, 1)
  if fsdp and size > 1 and DATA not in spec:
    for i, name in enumerate(axis_order):
      if spec[i] is None and named_shape[name] % size == 0:
        spec[i] = DATA
        break
  return PartitionSpec(*spec)


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a whole copy on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(ndim: int, mesh: Mesh, axis: int = 0) -> NamedSharding:
  """Sharding of an `ndim`-D array split along `axis` over "data" (0-D: replicated)."""
  if ndim == 0:
    return replicated(mesh)
  spec = [None] * ndim
  spec[axis] = DATA if data_size(mesh) > 1 else None
  return NamedSharding(mesh, PartitionSpec(*spec))


# ----------------------------------------------------------------------------------
# Placement.


def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """`x` (host or device array) placed with `sharding`, on one host or many.

  With several processes every process must pass the same (global) value; each keeps
  its own shards. A device array already placed with `sharding` is returned as is.
  """
  if isinstance(x, jax.Array):
    if x.sharding == sharding:
      return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      # Typed keys have no host form: place their raw bits.
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=impl)
    if jax.process_count() > 1 and x.is_fully_addressable:
      # A process-local array (e.g. a freshly loaded weight): go through the host,
      # since a device-to-device copy cannot reach other processes' devices.
      x = np.asarray(x)
  return jax.device_put(x, sharding)


def _on_mesh(x: Any, mesh: Mesh) -> bool:
  sharding = getattr(x, "sharding", None)
  return isinstance(sharding, NamedSharding) and sharding.mesh == mesh


def named_array_sharding(
    x: pz.nx.NamedArray, mesh: Mesh, rules: Mapping[str, str] = DEFAULT_RULES, fsdp: bool = True
) -> NamedSharding:
  """Sharding of a NamedArray's data array (positional axes first, replicated)."""
  names = tuple(x.named_shape)
  spec = param_spec(x.named_shape, names, mesh, rules, fsdp)
  return NamedSharding(mesh, PartitionSpec(*([None] * len(x.positional_shape)), *spec))


def shard_tree(
    tree: Any, mesh: Mesh, rules: Mapping[str, str] = DEFAULT_RULES, fsdp: bool = True,
    keep_placed: bool = True,
) -> Any:
  """Places every array of `tree` on `mesh`: NamedArrays by their axis names, other
  arrays replicated. With `keep_placed`, arrays already on `mesh` keep their sharding.
  """

  def place(leaf):
    if isinstance(leaf, pz.nx.NamedArrayView):
      leaf = leaf.as_namedarray()
    if isinstance(leaf, pz.nx.NamedArray):
      data = leaf.data_array
      if keep_placed and _on_mesh(data, mesh):
        return leaf
      return dataclasses.replace(leaf, data_array=put(data, named_array_sharding(leaf, mesh, rules, fsdp)))
    if isinstance(leaf, (jax.Array, np.ndarray)):
      if keep_placed and _on_mesh(leaf, mesh):
        return leaf
      return put(leaf, replicated(mesh))
    return leaf

  is_named = lambda x: isinstance(x, (pz.nx.NamedArray, pz.nx.NamedArrayView))
  return jax.tree.map(place, tree, is_leaf=is_named)


def path_label(path: Sequence[Any]) -> str:
  """A readable name of a pytree path: dict keys verbatim (labels), joined by '.'."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts) or "<root>"


def param_shardings(
    params: Any, mesh: Mesh, axis_names: Mapping[str, Sequence[str]] | None = None,
    rules: Mapping[str, str] = DEFAULT_RULES, fsdp: bool = True,
) -> Any:
  """Shardings for a pytree of positional arrays (e.g. a trainable's params).

  An array already on `mesh` keeps its sharding; one whose path (labels joined by
  ".") has axis names in `axis_names` is placed by `param_spec`; others are
  replicated.
  """
  axis_names = dict(axis_names or {})

  def one(path, x):
    if _on_mesh(x, mesh):
      return x.sharding
    names = axis_names.get(path_label(path))
    if names is not None and len(names) == np.ndim(x):
      names = tuple(names)
      return NamedSharding(mesh, param_spec(dict(zip(names, np.shape(x))), names, mesh, rules, fsdp))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, params)


def shard_model(
    model: Any, mesh: Mesh, rules: Mapping[str, str] = DEFAULT_RULES, fsdp: bool = True
) -> Any:
  """Returns a copy of `model` whose parameters live sharded on `mesh`.

  Parameters are placed by their axis names (`param_spec`); the model's other arrays
  (constants such as the embedding scale) are replicated, so that every input of a
  jitted call lives on the same devices (required with several processes).
  """
  unbound, params = pz.unbind_params(model)
  unbound = shard_tree(unbound, mesh, rules, fsdp)

  def place(param: pz.Parameter) -> pz.Parameter:
    value = shard_tree(param.value, mesh, rules, fsdp, keep_placed=False)
    return pz.Parameter(value=value, label=param.label)

  return pz.bind_variables(unbound, [place(p) for p in params])


def shard_batch(arrays: Any, mesh: Mesh, axis: int = 0) -> Any:
  """Places batch arrays split along `axis` over "data" (replicated if it does not divide)."""

  def place(x):
    if not isinstance(x, jax.Array):
      x = np.asarray(x)
    divides = x.ndim > axis and x.shape[axis] % data_size(mesh) == 0
    return put(x, batch_sharding(x.ndim, mesh, axis) if divides else replicated(mesh))

  return jax.tree.map(place, arrays)


def _arrays(tree: Any) -> Iterator[Any]:
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, pz.AbstractVariable):
      # Mutable variables (a bound model's parameters) are leaves; look inside.
      yield from _arrays(leaf.value)
    else:
      yield leaf


def mesh_of(tree: Any) -> Mesh | None:
  """The multi-device mesh the arrays of `tree` (e.g. a model) live on, or None.

  None for arrays on one device (or a one-device mesh): callers then take their
  single-device path unchanged.
  """
  for leaf in _arrays(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
      return sharding.mesh
  return None


def commit_to_device(tree: Any) -> Any:
  """`tree` with every array committed to one device, unless it spans a mesh.

  jit keys its compiled executables (and the persistent cache its HLO) on whether
  each argument is committed to a device. A loaded model's arrays are not; the trained
  leaves of an edited model are. Without this, every pattern of trained leaves (each
  edited model, each attacked one) would compile every scorer and training step anew.
  Committing aliases the buffer, it does not copy it.
  """
  if mesh_of(tree) is not None:
    return tree
  device = local_device()

  def commit(x):
    # Traced values (under jit or eval_shape) have no placement of their own.
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.committed:
      return jax.device_put(x, device)
    return x

  return jax.tree.map(commit, tree)


def unbind_for_jit(model: Any) -> tuple[Any, Any]:
  """`pz.unbind_params(model, freeze=True)` with the values committed to one device
  (`commit_to_device`), so that every model of the same structure reuses one
  compiled executable."""
  unbound, params = pz.unbind_params(model, freeze=True)
  return unbound, commit_to_device(params)


def to_host(x: Any) -> np.ndarray:
  """`np.asarray(x)` that also works for an array spanning several processes.

  `np.asarray` of a jitted output fails on a multi-host run unless that output is
  replicated; this gathers such an array onto every process first (a collective:
  every process must call it).
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def padded_size(n: int, multiple: int) -> int:
  """`n` rounded up to a multiple of `multiple`."""
  return -(-n // multiple) * multiple


def pad_rows(x: Any, size: int, axis: int = 0, fill: Any = None) -> np.ndarray:
  """`x` padded along `axis` to `size` rows: copies of its last row, or `fill`."""
  x = np.asarray(x)
  pad = size - x.shape[axis]
  if pad < 0:
    raise ValueError(f"cannot pad {x.shape[axis]} rows down to {size}")
  if pad == 0:
    return x
  last = np.take(x, [-1], axis=axis)
  extra = np.repeat(last, pad, axis=axis)
  if fill is not None:
    extra = np.full_like(extra, fill)
  return np.concatenate([x, extra], axis=axis)


def local_device() -> Any:
  """This process's first device (the single-device default, on every host)."""
  return jax.local_devices()[0]
