"""Retain ("general text") data: windows of token ids for the LM loss and KL checks.

Two sources (METHOD §1.3):
- `datasets` text (a hub id when online, or local text/JSON/parquet files offline),
  tokenized and cut into fixed-length windows;
- the offline default: text sampled once from the *unedited* model with a fixed seed
  and cached on disk, so training on it preserves the model's own distribution.

Windows are returned as left-padded `(tokens_BxL, positions_BxL)` arrays with BOS
first, the layout every loss and metric in the library expects.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax import sharding
from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax import io
from mech_unlearn_jax.models import forward


def windows_from_texts(
    tokenizer: Any, texts: Sequence[str], window: int, max_windows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes texts and cuts them into windows of `window` tokens (BOS + window-1)."""
  if window < 2:
    raise ValueError(f"retain window must be >= 2 tokens, got {window}")
  rows = []
  for text in texts:
    ids = tokenizer.encode(text, add_bos=False)
    for start in range(0, len(ids) - (window - 1) + 1, window - 1):
      rows.append([tokenizer.bos_id] + ids[start : start + window - 1])
      if max_windows and len(rows) >= max_windows:
        return forward.left_pad(rows, length=window)
  if not rows:
    raise ValueError(f"no text was long enough for a {window}-token window")
  return forward.left_pad(rows, length=window)


def load_text_dataset(source: str, split: str = "train", text_field: str = "text", limit: int = 1000) -> list[str]:
  """Texts from a `datasets` source: local files (.txt/.json/.jsonl/.parquet) or a hub id."""
  import datasets  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(source)
  if path.exists():
    kind = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
    if kind is None:
      raise ValueError(f"{source}: unsupported retain-text file type {path.suffix!r}")
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
  else:
    ds = datasets.load_dataset(source, split=split, streaming=True)
  texts = []
  for row in ds:
    if text_field not in row:
      raise KeyError(f"{source}: rows have no field {text_field!r} (fields: {sorted(row)})")
    texts.append(row[text_field])
    if len(texts) >= limit:
      break
  return texts


@partial(jax.jit, static_argnames=("window",))
def _sample_cached(unbound, params, cache, bos_id, rng, window: int, temperature: float):
  """Samples rows of `window` tokens (BOS first) one column at a time with a KV cache.

  `unbound` is a `with_kv_cache` model with parameters and cache unbound; `cache`
  its frozen (empty) cache. Column i's token is drawn with key fold_in(rng, i - 1).
  """
  batch = cache[0].value[0].named_shape["batch"]
  columns = jnp.arange(window, dtype=jnp.int32)
  model = pz.bind_variables(unbound, params)
  tokens = jnp.zeros((batch, window), jnp.int32).at[:, 0].set(bos_id)

  def step(i, carry):
    tokens, cache = carry
    decoder = pz.bind_variables(model, cache, unfreeze_as_copy=True)
    token, position = forward.named_inputs(
        jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1), jnp.full((batch, 1), i, jnp.int32)
    )
    kv_positions = pz.nx.wrap(jnp.broadcast_to(jnp.where(columns <= i, columns, -1), (batch, window)))
    logits = decoder(
        token, token_positions=position,
        **{iv.KV_POSITIONS: kv_positions.tag("batch", "seq"), iv.CACHE_END_INDEX: i},
    ).untag("batch", "seq", "vocabulary").unwrap()[:, 0]
    nxt = jax.random.categorical(jax.random.fold_in(rng, i), logits.astype(jnp.float32) / temperature)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None].astype(tokens.dtype), i + 1, axis=1)
    return tokens, tuple(v.freeze() for v in pz.unbind_state_vars(decoder)[1])

  tokens, _ = jax.lax.fori_loop(0, window - 1, step, (tokens, cache))
  return tokens


def sample_retain_windows(
    model: Any,
    bos_id: int,
    num_windows: int,
    window: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
  """Samples `num_windows` sequences of `window` tokens (BOS + window-1) from `model`.

  Decoding reuses keys and values (`interventions.with_kv_cache`): each new token
  costs one column of the model, not a forward over the whole window.
  """
  if window < 2:
    raise ValueError(f"retain window must be >= 2 tokens, got {window}")
  decoder = iv.with_kv_cache(model, batch_size, window)
  unbound, params = sharding.unbind_for_jit(decoder)
  unbound, cache = pz.unbind_state_vars(unbound, freeze=True)
  rows = []
  for start in range(0, num_windows, batch_size):
    n = min(batch_size, num_windows - start)
    rng = jax.random.fold_in(jax.random.key(seed), start)
    out = _sample_cached(unbound, params, cache, bos_id, rng, window, temperature)
    rows.extend(np.asarray(out)[:n].tolist())
  return forward.left_pad(rows, length=window)


def cached_sampled_windows(
    model: Any,
    model_id: str,
    bos_id: int,
    num_windows: int,
    window: int,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """`sample_retain_windows`, cached on disk under a key of its arguments."""
  root = pathlib.Path(
      cache_dir or os.environ.get("MECH_UNLEARN_JAX_CACHE", pathlib.Path.home() / ".cache")
  ) / "mech_unlearn_jax" / "retain"
  key = hashlib.sha256(f"{model_id}|{num_windows}|{window}|{seed}".encode()).hexdigest()[:16]
  path = root / f"sampled_{key}.npz"
  if path.is_file():
    data = io.read_npz(path, "cached retain text")
    return data["tokens"], data["positions"]
  tokens, positions = sample_retain_windows(model, bos_id, num_windows, window, seed)
  io.write_npz(path, {"tokens": tokens, "positions": positions})
  return tokens, positions
