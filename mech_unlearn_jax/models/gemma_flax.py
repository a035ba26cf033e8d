"""Gemma 3 checkpoints in the layout of the `gemma` library (Kaggle "Flax" releases).

An orbax checkpoint directory whose parameter tree is the one of
`google-deepmind/gemma`'s Flax transformer. The released checkpoints store it "flat"
(`{"transformer/layer_0/attn/q_einsum": {"w": ...}}`); `gm.ckpts.save_params` of
`model.init` parameters stores it "nested" (`{"layer_0": {"attn": {...}}}`, MLP
weights without the `w` level). Both are read here, as paths like

  transformer/embedder/input_embedding     [vocab, d]
  transformer/final_norm/scale             [d]
  transformer/layer_{i}/attn/q_einsum/w            [heads, d, head_dim]
  transformer/layer_{i}/attn/kv_einsum/w           [2, kv_heads, d, head_dim]  (k, v)
  transformer/layer_{i}/attn/qkv_einsum/w          [3, heads, d, head_dim]     (heads == kv_heads)
  transformer/layer_{i}/attn/attn_vec_einsum/w     [heads, head_dim, d]
  transformer/layer_{i}/attn/_query_norm/scale, _key_norm/scale   [head_dim]
  transformer/layer_{i}/{pre_attention,post_attention,pre_ffw,post_ffw}_norm/scale  [d]
  transformer/layer_{i}/mlp/gating_einsum/w        [2, hidden, d]  (gate, up)
  transformer/layer_{i}/mlp/linear/w               [hidden, d]

Conventions (from the `gemma` library's `gm/nn/_modules.py` and `_layers.py`):
- `q_einsum` is applied as 'BTD,NDH->BTNH'; head n of a grouped-query model belongs
  to KV head n // (heads / kv_heads), the order our canonical `q` rows use.
- `gating_einsum` is applied as '...F,NHF->...NH' (`transpose_gating_einsum=True`,
  every Gemma 3 size) and `gelu(gate[..., 0, :]) * gate[..., 1, :]`: index 0 is the
  gate, 1 the up projection. The older [2, d, hidden] orientation (Gemma 2 2B) is
  recognized by its shape.
- `RMSNorm` multiplies by `1 + scale`: canonical norms are `scale + 1`.
- The embedding is tied (decoded with its transpose) and scaled by sqrt(d).

The checkpoint carries no config: sizes come from the tree's shapes and everything
else (RoPE bases and scaling, query scale, sliding window, local/global pattern) from
a preset, given by the caller or found by matching the shapes against
`config.PRESETS`. Vision-tower parameters of multimodal checkpoints are skipped.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import transformer
from mech_unlearn_jax.models.config import TransformerConfig
from mech_unlearn_jax.models.loaders import (
    CheckpointError,
    bind_canonical,
    expected_canonical_shapes,
)

_NORMS = {
    "pre_attention_norm": "pre_attn_norm",
    "post_attention_norm": "post_attn_norm",
    "pre_ffw_norm": "pre_ffw_norm",
    "post_ffw_norm": "post_ffw_norm",
    "attn/_query_norm": "q_norm",
    "attn/_key_norm": "k_norm",
}
# Multimodal checkpoints: the vision tower and the embedder's image projection.
_SKIPPED = re.compile(r"^(SigLiPFromPatches_0|vision_encoder|embedder/mm_)")
# Sizes a preset must agree on with the checkpoint (the vocabulary may differ: the
# `gemma` library and Hugging Face pad Gemma 3's vocabulary differently).
_SIZE_FIELDS = (
    "num_layers", "embedding_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_hidden_dim",
    "qk_norm", "post_attn_norm", "post_ffw_norm",
)


def is_gemma_flax_checkpoint(directory: str | os.PathLike) -> bool:
  """Whether `directory` looks like an orbax checkpoint of the `gemma` library.

  Cheap (file names only): an orbax tree (`_METADATA`) and no Hugging Face
  `config.json`. `read_gemma_flax_tree` then checks the parameter names.
  """
  directory = pathlib.Path(directory)
  return (directory / "_METADATA").is_file() and not (directory / "config.json").is_file()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}/"))
    return out
  return {prefix[:-1]: tree}


def _normalize(path: str) -> str:
  """'transformer/layer_0/mlp/linear/w' and 'layer_0/mlp/linear' -> 'layer_0/mlp/linear'."""
  path = re.sub(r"^transformer/", "", path)
  return re.sub(r"/w$", "", path)


def _display(name: str) -> str:
  """A normalized name as the released (flat) checkpoints spell it."""
  if name.endswith(("_einsum", "/linear")):
    name += "/w"
  return f"transformer/{name}"


def read_gemma_flax_tree(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """Normalized name -> float32 array of every text-model parameter in `directory`.

  Names drop the `transformer/` root and the `w` leaf ("layer_0/attn/q_einsum").
  Arrays are restored as host numpy arrays (no device placement, whatever topology
  the checkpoint was saved from) and cast from their stored dtype (bfloat16 in the
  releases) to float32.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"Gemma checkpoint directory not found: {directory}")
  if not (directory / "_METADATA").is_file():
    raise CheckpointError(f"{directory}: not an orbax checkpoint (no _METADATA file)")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      metadata = ckptr.metadata(directory).item_metadata.tree
      paths = _flatten(metadata)
      if any(path.startswith("transformer/stacked_layers") for path in paths):
        raise CheckpointError(
            f"{directory}: 'stacked' Gemma checkpoints (transformer/stacked_layers/...) are"
            " not supported; save the parameters unstacked with gm.ckpts.save_params"
        )
      restore_args = {path: ocp.RestoreArgs(restore_type=np.ndarray) for path in paths}
      restored = ckptr.restore(
          directory,
          args=ocp.args.PyTreeRestore(restore_args=_unflatten_like(metadata, restore_args)),
      )
  except CheckpointError:
    raise
  except Exception as e:  # orbax raises assorted errors on damaged checkpoints
    raise CheckpointError(
        f"{directory}: cannot read the orbax checkpoint ({type(e).__name__}: {e})"
    ) from e
  out: dict[str, np.ndarray] = {}
  for path, value in _flatten(restored).items():
    name = _normalize(path)
    if _SKIPPED.match(name):
      continue
    if name in out:
      raise CheckpointError(f"{directory}: parameter {_display(name)!r} appears twice")
    out[name] = np.asarray(value).astype(np.float32)
  return out


def _unflatten_like(tree: Any, flat: Mapping[str, Any], prefix: str = "") -> Any:
  if isinstance(tree, Mapping):
    return {k: _unflatten_like(v, flat, f"{prefix}{k}/") for k, v in tree.items()}
  return flat[prefix[:-1]]


def _layer_indices(names: Mapping[str, Any], source: str) -> list[int]:
  indices = sorted({int(m.group(1)) for n in names if (m := re.match(r"layer_(\d+)/", n))})
  if not indices:
    raise CheckpointError(
        f"{source}: no 'transformer/layer_<i>/...' parameters: not a Gemma checkpoint"
    )
  if indices != list(range(len(indices))):
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    raise CheckpointError(
        f"{source}: layers {missing} are missing (found layers up to {indices[-1]})"
    )
  return indices


def _need(tree: Mapping[str, np.ndarray], name: str, source: str) -> np.ndarray:
  if name not in tree:
    raise CheckpointError(f"{source}: missing parameter {_display(name)!r}")
  return tree[name]


def _shape_error(source: str, name: str, got, want: str) -> CheckpointError:
  return CheckpointError(
      f"{source}: parameter {_display(name)!r} has shape {tuple(got)}, expected {want}"
  )


def sizes_from_tree(tree: Mapping[str, np.ndarray], source: str = "<gemma>") -> dict[str, Any]:
  """Config fields read off the parameter shapes (sizes and which norms exist)."""
  num_layers = len(_layer_indices(tree, source))
  embed = _need(tree, "embedder/input_embedding", source)
  if embed.ndim != 2:
    raise _shape_error(source, "embedder/input_embedding", embed.shape, "[vocab, d]")
  vocab, d = embed.shape
  if "layer_0/attn/qkv_einsum" in tree:
    qkv = tree["layer_0/attn/qkv_einsum"]
    if qkv.ndim != 4 or qkv.shape[0] != 3 or qkv.shape[2] != d:
      raise _shape_error(source, "layer_0/attn/qkv_einsum", qkv.shape, f"[3, heads, {d}, head_dim]")
    heads, head_dim, kv_heads = qkv.shape[1], qkv.shape[3], qkv.shape[1]
  else:
    q = _need(tree, "layer_0/attn/q_einsum", source)
    if q.ndim != 3 or q.shape[1] != d:
      raise _shape_error(source, "layer_0/attn/q_einsum", q.shape, f"[heads, {d}, head_dim]")
    heads, head_dim = q.shape[0], q.shape[2]
    kv = _need(tree, "layer_0/attn/kv_einsum", source)
    if kv.ndim != 4 or kv.shape[0] != 2:
      raise _shape_error(source, "layer_0/attn/kv_einsum", kv.shape, f"[2, kv_heads, {d}, {head_dim}]")
    kv_heads = kv.shape[1]
  linear = _need(tree, "layer_0/mlp/linear", source)
  if linear.ndim != 2 or linear.shape[1] != d:
    raise _shape_error(source, "layer_0/mlp/linear", linear.shape, f"[hidden, {d}]")
  return dict(
      vocab_size=int(vocab), embedding_dim=int(d), num_layers=num_layers, num_heads=int(heads),
      num_kv_heads=int(kv_heads), head_dim=int(head_dim), mlp_hidden_dim=int(linear.shape[0]),
      qk_norm="layer_0/attn/_query_norm/scale" in tree,
      post_attn_norm="layer_0/post_attention_norm/scale" in tree,
      post_ffw_norm="layer_0/post_ffw_norm/scale" in tree,
  )


def config_from_tree(
    tree: Mapping[str, np.ndarray],
    preset: str | TransformerConfig | None = None,
    source: str = "<gemma>",
) -> TransformerConfig:
  """The config of a checkpoint: its shapes, plus a preset for everything else.

  Args:
    tree: normalized name -> array (`read_gemma_flax_tree`).
    preset: a preset name or config supplying RoPE, query scale, window and layer
      pattern. None: the one preset whose sizes match the shapes.
    source: the checkpoint, for error messages.

  Raises:
    CheckpointError: the preset's sizes disagree with the shapes (naming the
      fields), or no / several presets match.
  """
  sizes = sizes_from_tree(tree, source)
  if preset is None:
    matches = [
        name for name, cfg in config_lib.PRESETS.items()
        if all(getattr(cfg, f) == sizes[f] for f in _SIZE_FIELDS)
    ]
    if len(matches) != 1:
      shown = {f: sizes[f] for f in _SIZE_FIELDS}
      raise CheckpointError(
          f"{source}: {'no preset matches' if not matches else f'presets {matches} all match'}"
          f" the checkpoint's shapes {shown}; pass preset= (one of {sorted(config_lib.PRESETS)})"
      )
    preset = matches[0]
  base = config_lib.get_preset(preset) if isinstance(preset, str) else preset
  wrong = [
      f"{f}={sizes[f]} (preset: {getattr(base, f)})"
      for f in _SIZE_FIELDS if getattr(base, f) != sizes[f]
  ]
  if wrong:
    name = preset if isinstance(preset, str) else "the given config"
    raise CheckpointError(
        f"{source}: the checkpoint does not match {name!r}: it has {', '.join(wrong)}"
    )
  return base.replace(vocab_size=sizes["vocab_size"])


def canonical_tensors(
    tree: Mapping[str, np.ndarray], config: TransformerConfig, source: str = "<gemma>"
) -> dict[str, np.ndarray]:
  """Maps a `gemma`-layout tree to the canonical [out, in] tensors of `loaders`."""
  d, p, f = config.embedding_dim, config.head_dim, config.mlp_hidden_dim
  h, k = config.num_heads, config.num_kv_heads
  expected = expected_canonical_shapes(config)

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    array = _need(tree, name, source)
    if tuple(array.shape) != shape:
      raise _shape_error(source, name, array.shape, str(shape))
    return array

  out = {
      "embed": get("embedder/input_embedding", (config.vocab_size, d)),
      "final_norm": get("final_norm/scale", (d,)) + 1.0,
  }
  used = {"embedder/input_embedding", "final_norm/scale"}
  for i in range(config.num_layers):
    a = f"layer_{i}/attn"
    if f"{a}/qkv_einsum" in tree and h == k:
      qkv = get(f"{a}/qkv_einsum", (3, h, d, p))
      q, kk, v = qkv[0], qkv[1], qkv[2]
      used.add(f"{a}/qkv_einsum")
    else:
      q = get(f"{a}/q_einsum", (h, d, p))
      kv = get(f"{a}/kv_einsum", (2, k, d, p))
      kk, v = kv[0], kv[1]
      used.update({f"{a}/q_einsum", f"{a}/kv_einsum"})
    # [heads, d, p] -> [heads * p, d]: rows ordered (head, head_dim), as Hugging Face.
    out[f"{i}.q"] = q.transpose(0, 2, 1).reshape(h * p, d)
    out[f"{i}.k"] = kk.transpose(0, 2, 1).reshape(k * p, d)
    out[f"{i}.v"] = v.transpose(0, 2, 1).reshape(k * p, d)
    out[f"{i}.o"] = get(f"{a}/attn_vec_einsum", (h, p, d)).reshape(h * p, d).T
    gating_name = f"layer_{i}/mlp/gating_einsum"
    gating = _need(tree, gating_name, source)
    if tuple(gating.shape) == (2, f, d):
      gate, up = gating[0], gating[1]
    elif tuple(gating.shape) == (2, d, f):  # transpose_gating_einsum=False
      gate, up = gating[0].T, gating[1].T
    else:
      raise _shape_error(source, gating_name, gating.shape, f"{(2, f, d)} (or {(2, d, f)})")
    out[f"{i}.gate"], out[f"{i}.up"] = gate, up
    out[f"{i}.down"] = get(f"layer_{i}/mlp/linear", (f, d)).T
    used.update({f"{a}/attn_vec_einsum", gating_name, f"layer_{i}/mlp/linear"})
    for flax_name, key in _NORMS.items():
      if f"{i}.{key}" in expected:  # the config says which norms exist
        name = f"layer_{i}/{flax_name}/scale"
        out[f"{i}.{key}"] = get(name, expected[f"{i}.{key}"]) + 1.0
        used.add(name)
  unexpected = sorted(set(tree) - used)
  if unexpected:
    raise CheckpointError(
        f"{source}: unexpected parameters {[_display(n) for n in unexpected[:5]]}"
        f"{'...' if len(unexpected) > 5 else ''} for {config.family} with this config"
    )
  return {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in out.items()}


def load_gemma_flax(
    directory: str | os.PathLike,
    preset: str | TransformerConfig | None = None,
    **config_overrides,
) -> transformer.CausalLM:
  """Loads a Gemma 3 checkpoint in the `gemma` library's orbax layout.

  Args:
    directory: the orbax checkpoint directory (e.g. a Kaggle "Flax" download's
      `gemma3-1b/`, next to its `tokenizer.model`).
    preset: the model's preset name (e.g. "gemma3-1b") or config; None finds the
      preset whose sizes match the checkpoint.
    **config_overrides: changes to the built model (e.g. `activation_dtype`).

  Raises:
    CheckpointError: naming the missing parameter, the parameter with the wrong
      shape, or the config field that does not match.
  """
  source = str(directory)
  tree = read_gemma_flax_tree(directory)
  config = config_from_tree(tree, preset, source)
  tensors = canonical_tensors(tree, config, source)
  config = config.replace(**config_overrides) if config_overrides else config
  return bind_canonical(config, tensors, source)


# ----------------------------------------------------------------------------------
# The other direction: a model -> the `gemma` layout (export, and tests).


def model_canonical_tensors(model: transformer.CausalLM) -> dict[str, np.ndarray]:
  """The canonical [out, in] tensors of a model (inverse of `loaders.bind_canonical`)."""
  config = model.config
  params = transformer.parameters_by_label(model)
  d = config.embedding_dim

  def value(label: str, *axes: str) -> np.ndarray:
    named = params[label].value
    rest = [a for a in named.named_shape if a not in axes]
    # Head axes come first in penzai's order (head_groups, query_heads / heads).
    order = [a for a in ("head_groups", "query_heads", "heads") if a in rest] + list(axes)
    return np.asarray(named.unwrap(*order), dtype=np.float32)

  out = {
      "embed": value("transformer/embedder.embeddings", "vocabulary", "embedding"),
      "final_norm": value("transformer/final_norm/scale.weights", "embedding"),
  }
  if not config.tie_embeddings:
    out["lm_head"] = value("transformer/lm_head.weights", "embedding", "vocabulary").T
  norm_labels = {
      "pre_attn_norm": "pre_attention_norm", "post_attn_norm": "post_attention_norm",
      "pre_ffw_norm": "pre_ffw_norm", "post_ffw_norm": "post_ffw_norm",
      "q_norm": "attention/query_norm", "k_norm": "attention/key_norm",
  }
  for i in range(config.num_layers):
    b = f"transformer/block_{i}"
    out[f"{i}.q"] = value(f"{b}/attention/query.weights", "projection", "embedding").reshape(-1, d)
    out[f"{i}.k"] = value(f"{b}/attention/key.weights", "projection", "embedding").reshape(-1, d)
    out[f"{i}.v"] = value(f"{b}/attention/value.weights", "projection", "embedding").reshape(-1, d)
    o = value(f"{b}/attention/output.weights", "projection", "embedding")  # [heads..., p, d]
    out[f"{i}.o"] = o.reshape(-1, d).T
    out[f"{i}.gate"] = value(f"{b}/mlp/gating_linear.weights", "neurons", "embedding")
    out[f"{i}.up"] = value(f"{b}/mlp/value_linear.weights", "neurons", "embedding")
    out[f"{i}.down"] = value(f"{b}/mlp/out_linear.weights", "embedding", "neurons")
    for key, label in norm_labels.items():
      full = f"{b}/{label}/scale.weights"
      if full in params:
        out[f"{i}.{key}"] = value(full, "projection" if key in ("q_norm", "k_norm") else "embedding")
  return out


def gemma_flax_tree(model: transformer.CausalLM) -> dict[str, dict[str, np.ndarray]]:
  """A model's parameters in the released (flat) `gemma` layout, float32.

  `{"transformer/layer_0/attn/q_einsum": {"w": [heads, d, head_dim]}, ...}`; norm
  scales are stored as `scale - 1`. Gemma 3 models only (tied, QK-norm, GeGLU).
  """
  config = model.config
  if config.family != "gemma3" or not config.tie_embeddings:
    raise ValueError(f"only Gemma 3 models have the gemma layout, got family {config.family!r}")
  c = model_canonical_tensors(model)
  d, p, h, k = config.embedding_dim, config.head_dim, config.num_heads, config.num_kv_heads
  heads_dp = lambda w, n: w.reshape(n, p, d).transpose(0, 2, 1)  # [n * p, d] -> [n, d, p]
  tree = {
      "transformer/embedder": {"input_embedding": c["embed"]},
      "transformer/final_norm": {"scale": c["final_norm"] - 1.0},
  }
  for i in range(config.num_layers):
    layer = f"transformer/layer_{i}"
    if h == k:
      qkv = np.stack([heads_dp(c[f"{i}.q"], h), heads_dp(c[f"{i}.k"], k), heads_dp(c[f"{i}.v"], k)])
      tree[f"{layer}/attn/qkv_einsum"] = {"w": qkv}
    else:
      tree[f"{layer}/attn/q_einsum"] = {"w": heads_dp(c[f"{i}.q"], h)}
      kv = np.stack([heads_dp(c[f"{i}.k"], k), heads_dp(c[f"{i}.v"], k)])
      tree[f"{layer}/attn/kv_einsum"] = {"w": kv}
    tree[f"{layer}/attn/attn_vec_einsum"] = {"w": c[f"{i}.o"].T.reshape(h, p, d)}
    tree[f"{layer}/mlp/gating_einsum"] = {"w": np.stack([c[f"{i}.gate"], c[f"{i}.up"]])}
    tree[f"{layer}/mlp/linear"] = {"w": c[f"{i}.down"].T}
    for flax_name, key in _NORMS.items():
      if f"{i}.{key}" in c:
        tree[f"{layer}/{flax_name}"] = {"scale": c[f"{i}.{key}"] - 1.0}
  return tree


def save_gemma_flax(
    model: transformer.CausalLM, directory: str | os.PathLike, dtype: str = "float32"
) -> None:
  """Writes a Gemma 3 model as an orbax checkpoint in the released `gemma` layout.

  The result loads with `load_gemma_flax` and, being the layout of the Kaggle
  releases, with the `gemma` library's `gm.ckpts.load_params`. `dtype` is the
  stored dtype ("bfloat16" as the releases).
  """
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  tree = {
      path: {leaf: np.asarray(array).astype(np_dtype) for leaf, array in leaves.items()}
      for path, leaves in gemma_flax_tree(model).items()
  }
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(pathlib.Path(directory).resolve(), tree)  # orbax writes a temp dir, then renames
