"""Attribution patching vs exact activation patching; corruption; Spearman."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.localize import attribution_patching as ap
from mech_unlearn_jax.localize import corruption
from mech_unlearn_jax.models.config import get_preset
from mech_unlearn_jax.models.forward import last_logits, left_pad
from mech_unlearn_jax.models.transformer import build_transformer

CONFIG = get_preset("tiny-gemma3")
LENGTHS = (9, 12, 7, 12, 10)


@pytest.fixture(scope="module")
def model():
  return build_transformer(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def batches():
  rng = np.random.default_rng(0)
  tokens, positions = left_pad([rng.integers(3, CONFIG.vocab_size, n).tolist() for n in LENGTHS])
  subject = np.zeros_like(tokens, bool)
  for row, n in enumerate(LENGTHS):
    subject[row, tokens.shape[1] - n + 3 : tokens.shape[1] - n + 5] = True
  clean = FactBatch(
      tokens_BxL=tokens, positions_BxL=positions,
      answer_ids_B=np.array([5, 6, 7, 8, 9]),
      wrong_ids_BxK=np.array([[10, 11], [12, -1], [13, 14], [15, 16], [17, 18]]),
      subject_mask_BxL=subject,
  )
  return clean, corruption.random_token_replacement(tokens, subject, CONFIG.vocab_size, seed=1)


@pytest.fixture(scope="module")
def result(model, batches):
  clean, corrupt = batches
  return ap.attribution_patching(model, clean, corrupt, ap.APConfig(per_neuron=True))


def test_candidate_logits_and_logit_diff_match_full_logits(model, batches):
  clean, _ = batches
  full = np.asarray(last_logits(model, clean.tokens_BxL, clean.positions_BxL))
  hidden = ap.last_hidden(model, clean.tokens_BxL, clean.positions_BxL)
  cands = clean.candidate_ids_BxC
  picked = np.asarray(ap.candidate_logits(model, hidden, cands))
  expected = np.where(cands >= 0, np.take_along_axis(full, np.maximum(cands, 0), 1), 0)
  np.testing.assert_allclose(picked, expected, rtol=1e-5, atol=1e-5)
  ld = np.asarray(ap.logit_diff(jnp.asarray(picked), cands))
  manual = [full[i, a] - np.mean([full[i, w] for w in ws if w >= 0])
            for i, (a, ws) in enumerate(zip(clean.answer_ids_B, clean.wrong_ids_BxK))]
  np.testing.assert_allclose(ld, manual, rtol=1e-5, atol=1e-5)


def test_scores_have_every_site_and_head_axes(model, result):
  assert set(result.scores) == set(iv.all_sites(CONFIG.num_layers, ap.DEFAULT_KINDS))
  flat = result.as_numpy()
  for site, values in flat.items():
    expected = {"q": 4, "head_out": 4, "k": 2, "v": 2}.get(site.kind)
    assert values.shape == ((expected,) if expected else ()), site
    assert np.all(np.isfinite(values))
  assert dict(result.by_kind("head_out").named_shape) == {"layers": 3, "head_groups": 2, "query_heads": 2}
  matrices = result.matrix_scores()
  assert set(matrices) == {(l, m) for l in range(3) for m in ap.MATRIX_SITES}
  # Down's score is read at its input: per-neuron scores add up to it.
  for layer in range(3):
    np.testing.assert_allclose(
        result.neuron_scores[layer].unwrap("neurons").sum(), flat[iv.Site(layer, "mlp_hidden")], rtol=1e-4, atol=1e-6)


def test_ap_equals_the_linearized_exact_patching_effect(model, batches, result):
  clean, corrupt = batches
  components = [ap.Component(iv.Site(l, k)) for l in range(3) for k in ("mlp_in", "mlp_out", "gate", "up", "mlp_hidden")]
  components += [ap.Component(iv.Site(l, "head_out"), h) for l in range(3) for h in range(4)]
  components += [ap.Component(iv.Site(1, "q"), 3), ap.Component(iv.Site(2, "k"), 1), ap.Component(iv.Site(0, "v"), 0)]
  eps = 1e-2
  # Central differences cancel the second-order term: error O(eps^2).
  plus = ap.activation_patching(model, clean, corrupt, components, eps=eps)
  minus = ap.activation_patching(model, clean, corrupt, components, eps=-eps)
  linearized = (plus + minus) / 2
  approx = ap.ap_component_scores(result, components)
  np.testing.assert_allclose(approx, linearized, rtol=2e-2, atol=5e-3)
  # And the full patch (eps = 1) differs from the linear prediction: the test can fail.
  full = ap.activation_patching(model, clean, corrupt, components)
  assert np.abs(full - approx).max() > 0.05


def test_batching_and_prefix_reuse_do_not_change_scores(model, batches, result, monkeypatch):
  clean, corrupt = batches
  first = ap.first_differing_column(clean.tokens_BxL, corrupt)
  assert first > 0
  kinds = ("head_out", "k", "mlp_out")
  starts = []
  jitted = ap._jitted_ap
  monkeypatch.setattr(ap, "_jitted_ap", lambda *a, **k: starts.append(a[-1]) or jitted(*a, **k))
  chunked = ap.attribution_patching(model, clean, corrupt, ap.APConfig(batch_size=2, kinds=kinds))
  full = ap.attribution_patching(model, clean, corrupt, ap.APConfig(reuse_prefix=False, kinds=kinds))
  assert starts == [first, first, first, 0]  # every chunk reuses the same prefix
  for other in (chunked, full):
    for site, values in other.as_numpy().items():
      np.testing.assert_allclose(values, result.as_numpy()[site], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(other.clean_logit_diff_B, result.clean_logit_diff_B, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(other.corrupt_logit_diff_B, result.corrupt_logit_diff_B, rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_clear_errors(model, batches):
  clean, corrupt = batches
  with pytest.raises(ValueError, match="shape"):
    ap.attribution_patching(model, clean, corrupt[:, 1:])
  no_wrong = FactBatch(clean.tokens_BxL, clean.positions_BxL, clean.answer_ids_B,
                       np.full_like(clean.wrong_ids_BxK, -1), clean.subject_mask_BxL)
  with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3, 4\] have no wrong answers"):
    ap.attribution_patching(model, no_wrong, corrupt)
  with pytest.raises(ValueError, match="equal the clean tokens"):
    ap.attribution_patching(model, clean, clean.tokens_BxL, ap.APConfig(kinds=("mlp_out",)))
  with pytest.raises(ValueError, match="unsupported kinds"):
    ap.APConfig(kinds=("mlp",))


def test_spearman():
  assert ap.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
  assert ap.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # Ties get average ranks: ranks [1.5, 1.5, 3] vs [1, 2, 3].
  assert ap.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])


def test_random_token_replacement_is_seeded_and_masked():
  tokens = np.arange(24, dtype=np.int32).reshape(3, 8)
  mask = np.zeros((3, 8), bool)
  mask[:, 2:4] = True
  a = corruption.random_token_replacement(tokens, mask, np.array([100, 101, 102]), seed=3)
  b = corruption.random_token_replacement(tokens, mask, np.array([100, 101, 102]), seed=3)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[~mask], tokens[~mask])
  assert set(a[mask].tolist()) <= {100, 101, 102}
  c = corruption.random_token_replacement(tokens, mask, np.array([100, 101, 102]), seed=4)
  assert not np.array_equal(a, c)


class WordTokenizer:
  """Toy tokenizer: ids are words; id 7 decodes to two words, so it never round-trips."""

  words = ["<bos>", "Fact:", "Ann", "Lee", "plays", "golf", "x", "two words", "y", "z", "two", "words"]

  def encode(self, text, add_bos=True):
    ids = [self.words.index(w) for w in text.split()]
    return [0] + ids if add_bos else ids

  def decode(self, ids):
    return " ".join(self.words[i] for i in ids)


def test_corrupt_subjects_keeps_round_trip_length():
  tok = WordTokenizer()
  tokens, positions = left_pad([tok.encode("Fact: Ann Lee plays golf"), tok.encode("Fact: Lee plays golf")])
  subject = np.zeros_like(tokens, bool)
  subject[0, 2:4] = True
  subject[1, 3] = True
  batch = FactBatch(tokens, positions, np.array([5, 5]), np.array([[6], [6]]), subject)
  pool = np.array([6, 7, 8, 9])
  out = corruption.corrupt_subjects(tok, batch, pool, seed=0)
  np.testing.assert_array_equal(out[~subject], tokens[~subject])
  assert set(out[subject].tolist()) <= {6, 8, 9}  # never the two-word token
  np.testing.assert_array_equal(out, corruption.corrupt_subjects(tok, batch, pool, seed=0))
  # Row 1's corruption does not depend on row 0 being in the batch.
  alone = corruption.corrupt_subjects(tok, batch.slice(1, 2), pool, seed=0)
  assert alone[0, subject[1]].tolist() != [] and corruption.corrupted_batch(batch, out).tokens_BxL is out
  with pytest.raises(ValueError, match="no random subject replacement"):
    corruption.corrupt_subjects(tok, batch, np.array([7]), seed=0, max_tries=5)
