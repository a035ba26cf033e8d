"""Scoring and retain-text logic on a tiny random model."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mech_unlearn_jax import batch as batch_lib
from mech_unlearn_jax import sharding
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.data import retain
from mech_unlearn_jax.evals import scoring
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import forward, transformer


@pytest.fixture(scope="module")
def tiny():
  return transformer.build_transformer(config_lib.get_preset("tiny-gemma3"), jax.random.key(3))


def _batch(n=5):
  rng = np.random.default_rng(0)
  seqs = [[2] + rng.integers(4, 500, size=rng.integers(3, 9)).tolist() for _ in range(n)]
  tokens, positions = forward.left_pad(seqs, multiple=8)
  return FactBatch(
      tokens_BxL=tokens, positions_BxL=positions,
      answer_ids_B=np.array([10, 11, 12, 13, 14][:n], np.int32),
      wrong_ids_BxK=np.array([[20, 21], [22, -1], [23, 24], [25, 26], [27, 28]][:n], np.int32),
      subject_mask_BxL=np.zeros_like(tokens, bool),
  )


def test_fact_scores_match_direct_computation(tiny):
  batch = _batch()
  scores = scoring.score_facts(tiny, batch, chunk_size=2)  # exercises chunk padding
  logits = np.asarray(forward.last_logits(tiny, batch.tokens_BxL, batch.positions_BxL), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  for row in range(batch.size):
    cands = [c for c in batch.candidate_ids_BxC[row] if c >= 0]
    np.testing.assert_allclose(scores.logprob_full[row], logp[row, cands[0]], atol=1e-4)
    p = np.exp(logp[row, cands])
    np.testing.assert_allclose(scores.prob_normalized[row], p[0] / p.sum(), atol=1e-5)
    assert scores.correct_argmax_candidates[row] == (np.argmax(logp[row, cands]) == 0)
    assert scores.correct_argmax_full[row] == (np.argmax(logp[row]) == cands[0])
  # Padded candidate (-1) gets zero normalized probability.
  assert scores.candidate_probs[1, 2] == 0.0
  summary = scores.summary()
  assert summary["n"] == 5 and 0 <= summary["prob_normalized"] <= 1


def test_text_metrics_and_kl(tiny):
  tokens, positions = forward.left_pad([[2, 5, 6, 7, 8], [2, 9, 10]], multiple=4)
  metrics = scoring.text_metrics(tiny, tokens, positions)
  assert metrics["tokens"] == 4 + 2  # real next-token pairs only
  assert metrics["loss"] > 0
  assert scoring.kl_divergence(tiny, tiny, tokens, positions) == pytest.approx(0.0, abs=1e-6)
  other = transformer.build_transformer(tiny.config, jax.random.key(4))
  assert scoring.kl_divergence(tiny, other, tokens, positions) > 1e-3


def test_text_metrics_and_kl_unembed_one_row_at_a_time_with_the_same_values(monkeypatch):
  # A wide vocabulary makes the logits the largest buffer, as in the 262k-vocabulary
  # models: the row-wise path must give the batched path's numbers with a fraction of
  # its scratch memory (the batched path held every row's [L, V] logits at once).
  config = dataclasses.replace(config_lib.get_preset("tiny-gemma3"), vocab_size=16_384)
  a = transformer.build_transformer(config, jax.random.key(5))
  b = transformer.build_transformer(config, jax.random.key(6))
  rng = np.random.default_rng(1)
  seqs = [[2] + rng.integers(4, 16_000, size=rng.integers(4, 24)).tolist() for _ in range(8)]
  tokens, positions = forward.left_pad(seqs, multiple=8)
  ua, pa = sharding.unbind_for_jit(a)
  ub, pb = sharding.unbind_for_jit(b)
  for fn, args in ((scoring._text_chunk, (ua, pa)), (scoring._kl_chunk, (ua, pa, ub, pb))):
    rows = fn(*args, tokens, positions, row_wise=True)
    batched = fn(*args, tokens, positions, row_wise=False)
    np.testing.assert_allclose(np.asarray(rows), np.asarray(batched), rtol=1e-5)
    temp = lambda rw: fn.lower(*args, tokens, positions, row_wise=rw).compile().memory_analysis().temp_size_in_bytes
    one_row_logits = tokens.shape[1] * config.vocab_size * 4
    assert temp(False) >= 8 * one_row_logits  # every row's logits at once
    assert temp(True) < temp(False) / 3
  # The public functions take the row-wise path on one device (chunks of 3: shapes not
  # traced above, so tracing goes through `map_vocab_rows` again).
  mapped = []
  real_map = forward.map_vocab_rows
  monkeypatch.setattr(forward, "map_vocab_rows", lambda *a: mapped.append(1) or real_map(*a))
  manual = np.asarray(scoring._text_chunk(ua, pa, tokens, positions, row_wise=False), np.float64)
  metrics = scoring.text_metrics(a, tokens, positions, chunk_size=3)
  assert metrics["tokens"] == int(manual[2])
  assert metrics["loss"] == pytest.approx(manual[0] / manual[2], rel=1e-5)
  kl = np.asarray(scoring._kl_chunk(ua, pa, ub, pb, tokens, positions, row_wise=False), np.float64)
  assert scoring.kl_divergence(a, b, tokens, positions, chunk_size=3) == pytest.approx(kl[0] / kl[1], rel=1e-5)
  assert len(mapped) == 4  # text and KL, chunks of 3 and of 2 rows


def test_shared_prefix_found_and_split():
  tokens, positions = forward.left_pad([[2, 7, 8, 9, 5], [2, 7, 8, 9, 6, 1], [2, 7, 8, 4]])
  assert batch_lib.shared_prefix_length(tokens, positions) == 3  # [2, 7, 8]: row 3 differs next
  prefix, suffix, suffix_positions = batch_lib.split_prefix(tokens, positions, 3, multiple=4)
  assert prefix.tolist() == [2, 7, 8]
  assert suffix.tolist() == [[0, 0, 9, 5], [0, 9, 6, 1], [0, 0, 0, 4]]
  assert suffix_positions.tolist() == [[-1, -1, 3, 4], [-1, 3, 4, 5], [-1, -1, -1, 3]]
  # Every row keeps at least one token of its own.
  same, same_positions = forward.left_pad([[2, 7, 8], [2, 7, 8]])
  assert batch_lib.shared_prefix_length(same, same_positions) == 2


def test_scores_with_a_shared_prefix_match_whole_rows(tiny):
  rng = np.random.default_rng(1)
  few_shot = [2] + rng.integers(4, 500, size=9).tolist()
  seqs = [few_shot + rng.integers(4, 500, size=rng.integers(1, 7)).tolist() for _ in range(5)]
  tokens, positions = forward.left_pad(seqs, multiple=8)
  batch = dataclasses.replace(_batch(), tokens_BxL=tokens, positions_BxL=positions,
                              subject_mask_BxL=np.zeros_like(tokens, bool))
  assert batch_lib.shared_prefix_length(tokens, positions) >= 10
  shared = scoring.score_facts(tiny, batch, chunk_size=2)
  whole = scoring.score_facts(tiny, batch, chunk_size=2, share_prefix=False)
  np.testing.assert_allclose(shared.logprob_full, whole.logprob_full, atol=1e-4)
  np.testing.assert_allclose(shared.candidate_probs, whole.candidate_probs, atol=1e-5)
  np.testing.assert_array_equal(shared.correct_argmax_full, whole.correct_argmax_full)
  # A batch already split at its prefix (as training draws them) scores the same.
  split = scoring.score_facts(tiny, batch_lib.share_prefix(batch), chunk_size=2)
  np.testing.assert_allclose(split.logprob_full, whole.logprob_full, atol=1e-4)


def test_sampling_is_seeded_and_cached(tiny, tmp_path):
  a = retain.cached_sampled_windows(tiny, "tiny", 2, num_windows=3, window=6, seed=1, cache_dir=tmp_path)
  b = retain.cached_sampled_windows(tiny, "tiny", 2, num_windows=3, window=6, seed=1, cache_dir=tmp_path)
  c = retain.sample_retain_windows(tiny, 2, num_windows=3, window=6, seed=2)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[0].shape == (3, 6) and (a[0][:, 0] == 2).all() and (a[1] == np.arange(6)).all()
  assert not np.array_equal(a[0], c[0])
  assert len(list(tmp_path.rglob("*.npz"))) == 1


def test_kv_cached_sampling_draws_what_full_forwards_draw(tiny):
  """Each column's token is the categorical draw from a full forward over the prefix."""
  window, seed, batch = 5, 3, 4
  tokens, positions = retain.sample_retain_windows(tiny, 2, num_windows=5, window=window, seed=seed, batch_size=batch)
  assert tokens.shape == (5, window) and (positions == np.arange(window)).all()
  for start in (0, batch):  # the second batch has one real row: padding rows are drawn too
    rows = tokens[start : start + batch]
    rng = jax.random.fold_in(jax.random.key(seed), start)
    for col in range(1, window):
      prefix = np.zeros((batch, col), np.int32)
      prefix[: len(rows)] = rows[:, :col]
      logits = forward.last_logits(tiny, prefix, np.broadcast_to(np.arange(col), prefix.shape))
      drawn = jax.random.categorical(jax.random.fold_in(rng, col - 1), logits.astype(jnp.float32))
      np.testing.assert_array_equal(np.asarray(drawn)[: len(rows)], rows[:, col], err_msg=f"column {col}")


def test_windows_from_texts_rejects_tiny_window():
  class Tok:
    bos_id = 2
    def encode(self, text, add_bos=True):
      return [ord(ch) % 500 for ch in text]
  tokens, positions = retain.windows_from_texts(Tok(), ["abcdefghij"], window=4)
  assert tokens.shape == (3, 4) and (tokens[:, 0] == 2).all()
  with pytest.raises(ValueError, match="window"):
    retain.windows_from_texts(Tok(), ["abc"], window=1)


def test_soft_prompted_models_are_scored_whole(tiny):
  from mech_unlearn_jax.train import soft_prompt

  rng = np.random.default_rng(2)
  seqs = [[2] + [9, 8, 7, 6, 5] + rng.integers(10, 500, size=3).tolist() for _ in range(4)]
  tokens, positions = forward.left_pad(seqs)
  batch = dataclasses.replace(_batch(4), tokens_BxL=tokens, positions_BxL=positions,
                              subject_mask_BxL=np.zeros_like(tokens, bool))
  prompted = soft_prompt.with_soft_prompt(tiny, jnp.ones((2, tiny.config.embedding_dim)))
  a = scoring.score_facts(prompted, batch)
  b = scoring.score_facts(prompted, batch, share_prefix=False)
  np.testing.assert_allclose(a.logprob_full, b.logprob_full, atol=1e-6)


def test_an_edited_model_reuses_the_unedited_models_compiled_scorer(tiny):
  # Trained leaves come back committed to a device, loaded ones do not; jit (and the
  # persistent cache, through the HLO) keys on that, so without committing every
  # edited or attacked model compiled every scorer anew.
  from mech_unlearn_jax import train as train_lib  # pylint: disable=g-import-not-at-top

  batch = _batch()
  mask = {label: ("/mlp/" in label and "block_1/" in label) for label in transformer.parameter_shapes(tiny.config)}
  data = train_lib.EditData(forget=batch, maintain=batch, retain=None)
  config = train_lib.EditConfig(steps=1, lr=1e-2, forget_batch_size=5, maintain_batch_size=5, retain_coef=0.0)
  edited = train_lib.edit(tiny, mask, data, config, log_fn=None).model

  scoring.score_facts(tiny, batch, chunk_size=8, share_prefix=False)
  compiled = scoring._score_chunk._cache_size()
  scoring.score_facts(edited, batch, chunk_size=8, share_prefix=False)
  assert scoring._score_chunk._cache_size() == compiled
