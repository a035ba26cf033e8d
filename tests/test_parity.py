"""Parity of the penzai Gemma 3 270M with an independent implementation.

The fixture (`fixtures/gemma3_270m_parity.npz`, written by
`fixtures/make_parity_fixture.py` with Hugging Face transformers reading the same GGUF)
holds 21 prompts: the sports one-shot prompt, CounterFact prompts, unicode, code,
whitespace runs and a 674-token prompt that exercises the 512-token sliding window.
Checked: identical token ids; fp32 logits within 1e-3 at every position on the top-20
and 1024 fixed vocabulary ids; identical top-1 token at every position.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "gemma3_270m_parity.npz"
LOGIT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def real():
  try:
    from mech_unlearn_jax.models import loaders
    from mech_unlearn_jax.models.loaders import load_tokenizer
    path = loaders.default_gguf_path()
  except ImportError as e:
    pytest.skip(f"default model package not installed: {e}")
  return loaders.load_gguf(path), load_tokenizer("default")


def test_parity_with_transformers(real):
  from mech_unlearn_jax.models import forward

  model, tokenizer = real
  data = np.load(FIXTURE)
  offsets = data["offsets"]
  prompts = [str(p) for p in data["prompts"]]
  ids = [data["token_ids"][offsets[i] : offsets[i + 1]].tolist() for i in range(len(prompts))]
  for i, prompt in enumerate(prompts):
    assert tokenizer.encode(prompt, add_bos=True) == ids[i], f"token ids differ for prompt {i}: {prompt[:60]!r}"

  table = model.unembed.sublayers[0].table.embeddings.value.unwrap("vocabulary", "embedding")
  hidden_fn = jax.jit(lambda t, p: forward.residual_stream(model, t, p))
  # Short prompts in one left-padded batch, the long one alone (padding is invisible).
  groups = [[i for i in range(len(ids)) if len(ids[i]) <= 64], [i for i in range(len(ids)) if len(ids[i]) > 64]]
  assert groups[1], "the fixture must contain a prompt longer than the sliding window"
  worst = 0.0
  for group in groups:
    tokens, positions = forward.left_pad([ids[i] for i in group], multiple=8)
    hidden = np.asarray(hidden_fn(tokens, positions))
    for row, i in enumerate(group):
      n = len(ids[i])
      h = jnp.asarray(hidden[row, -n:])  # [n, D], real positions only
      sl = slice(offsets[i], offsets[i + 1])
      ours_top = np.asarray(jnp.einsum("nd,nkd->nk", h, table[data["top_ids"][sl]]))
      ours_fixed = np.asarray(h @ table[data["fixed_ids"]].T)
      worst = max(worst, np.abs(ours_top - data["top_logits"][sl]).max(), np.abs(ours_fixed - data["fixed_logits"][sl]).max())
      argmax = np.asarray(jnp.argmax(h @ table.T, axis=-1))
      mismatch = np.flatnonzero(argmax != data["top_ids"][sl][:, 0])
      assert mismatch.size == 0, f"prompt {i}: top-1 differs at positions {mismatch[:10]}"
  print(f"parity: max |logit difference| = {worst:.2e} over {offsets[-1]} positions")
  assert worst <= LOGIT_TOLERANCE, f"max |logit difference| {worst:.2e} > {LOGIT_TOLERANCE}"
