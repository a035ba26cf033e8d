"""Parameter masks and baselines on the tiny config: coverage, budgets, layouts, files."""

import os

import numpy as np
import pytest
import treescope

from mech_unlearn_jax.localize import baselines
from mech_unlearn_jax.localize import masks as M
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import loaders, transformer

TINY = config_lib.get_preset("tiny-gemma3")  # d=32, 4 query heads in 2 KV groups, head_dim 8
ATTN_SIZE = 32 * 8 * (4 + 2 + 2 + 4)
MLP_SIZE = 3 * 32 * 64


def _loader_layout_model(config):
  """A model whose parameters use the checkpoint loader's axis order, not build order."""
  rng = np.random.default_rng(0)
  tensors = {
      k: rng.normal(size=s).astype(np.float32)
      for k, s in loaders.expected_canonical_shapes(config).items()
  }
  return loaders.bind_canonical(config, tensors, "test")


def test_masks_cover_every_label_and_freeze_non_matrices():
  labels = set(transformer.parameter_shapes(TINY))
  mask = M.mask_from_units(TINY, M.all_units(TINY))
  assert set(mask) == labels
  for label, value in mask.items():
    assert value == (M.parse_matrix_label(label) is not None), label
  assert not any(mask[l] for l in labels if "embed" in l or "norm" in l)
  assert M.trained_parameter_count(mask, TINY) == TINY.num_block_parameters()


def test_unit_parameter_count():
  assert M.unit_parameter_count(TINY, M.Unit(0, "attn")) == ATTN_SIZE
  assert M.unit_parameter_count(TINY, M.Unit(2, "mlp")) == MLP_SIZE
  mask = M.mask_from_units(TINY, [M.Unit(1, "mlp"), M.Unit(2, "attn")])
  assert M.trained_parameter_count(mask, TINY) == ATTN_SIZE + MLP_SIZE
  assert [str(u) for u in M.mask_units(mask, TINY)] == ["mlp1", "attn2"]


def test_validate_mask_names_the_problem():
  mask = M.empty_mask(TINY)
  label = M.matrix_label(0, "query")
  del mask[label]
  with pytest.raises(M.MaskError, match="missing"):
    M.validate_mask(mask, TINY)
  mask = M.empty_mask(TINY)
  mask[label] = np.zeros((3, 3), bool)
  with pytest.raises(M.MaskError, match=r"query\.weights.*expected \(32, 2, 2, 8\)"):
    M.validate_mask(mask, TINY)
  mask = M.empty_mask(TINY)
  mask["transformer/embedder.embeddings"] = True
  with pytest.raises(M.MaskError, match="embedder"):
    M.validate_mask(mask, TINY)
  with pytest.raises(ValueError, match="always stay frozen"):
    M.mask_from_labels(TINY, ["transformer/final_norm/scale.weights"])


def _random_scores(rng):
  scores = {}
  for layer in range(TINY.num_layers):
    scores[(layer, "q")] = rng.normal(size=4)
    scores[(layer, "head_out")] = rng.normal(size=4)
    scores[(layer, "mlp_in")] = rng.normal()
    scores[(layer, "mlp_out")] = rng.normal()
  return scores


@pytest.mark.parametrize("mode", ["reference", "per_matrix"])
def test_budget_overshoot_is_at_most_one_item(mode):
  rng = np.random.default_rng(0)
  for trial in range(30):
    scores = _random_scores(rng)
    budget = int(rng.integers(1, TINY.num_block_parameters()))
    sel = M.scores_to_units(scores, TINY, budget, mode=mode)
    sizes = [
        M.unit_parameter_count(TINY, c) if isinstance(c, M.Unit)
        else int(np.prod(M.parameter_shape(TINY, c)))
        for c in sel.chosen
    ]
    assert sel.trained_parameters == sum(sizes) == M.trained_parameter_count(sel.mask, TINY)
    assert sel.trained_parameters >= budget or len(sel.chosen) == len(sel.scores)
    assert sel.trained_parameters - sizes[-1] < budget, (trial, sizes, budget)
    ranked = [abs(sel.scores[str(c)]) for c in sel.chosen]
    assert ranked == sorted(ranked, reverse=True)


def test_reference_mode_sums_signed_head_scores_so_they_cancel():
  scores = {
      (0, "q"): np.array([5.0, -5.0, 0.0, 0.0]),  # large heads that cancel in the unit sum
      (1, "mlp_out"): 0.1,
      (2, "head_out"): np.array([0.3, 0.3, -0.1, 0.0]),  # sums to 0.5
  }
  sel = M.scores_to_units(scores, TINY, budget=1, mode="reference")
  assert sel.scores["attn0"] == pytest.approx(0.0)
  assert sel.scores["attn2"] == pytest.approx(0.5)
  assert sel.units == (M.Unit(2, "attn"),)
  sel = M.scores_to_units(scores, TINY, budget=ATTN_SIZE + 1, mode="reference")
  assert sel.units == (M.Unit(2, "attn"), M.Unit(1, "mlp"))
  # Per-matrix mode aggregates |score|: the cancelling query heads now rank first.
  sel = M.scores_to_units(scores, TINY, budget=1, mode="per_matrix")
  assert sel.chosen == (M.matrix_label(0, "query"),)
  assert sel.scores[M.matrix_label(0, "query")] == pytest.approx(10.0)
  assert sel.trained_parameters == 32 * 4 * 8


def test_mlp_only_selection_and_bad_scores():
  scores = {(0, "attn_out"): 9.0, (1, "mlp_out"): 0.5, (2, "mlp_in"): -0.7}
  sel = M.scores_to_units(scores, TINY, budget=MLP_SIZE, kinds=("mlp",))
  assert sel.units == (M.Unit(2, "mlp"),)
  with pytest.raises(ValueError, match="unknown component kind"):
    M.scores_to_units({(0, "bogus"): 1.0}, TINY, 10)
  with pytest.raises(ValueError, match="not finite"):
    M.scores_to_units({(0, "q"): [np.nan, 0, 0, 0]}, TINY, 10)


def test_head_masks_have_the_right_slices():
  mask = M.mask_from_heads(TINY, [(1, 3)])
  q = mask[M.matrix_label(1, "query")]
  assert q.shape == M.parameter_shape(TINY, M.matrix_label(1, "query")) == (32, 2, 2, 8)
  # Head 3 = KV group 1, query head 1 (group-major flattening, as checkpoints store it).
  assert q[:, 1, 1].all() and q.sum() == 32 * 8
  o = mask[M.matrix_label(1, "output")]
  assert o[1, 1].all() and o.sum() == 8 * 32
  k = mask[M.matrix_label(1, "key")]
  assert k[:, 1].all() and k.sum() == 32 * 8
  assert M.trained_parameter_count(mask, TINY) == 4 * 32 * 8
  assert M.trained_labels(mask) == [M.matrix_label(1, m) for m in ("query", "key", "value", "output")]
  no_kv = M.mask_from_heads(TINY, [(1, 3), (1, 2)], include_kv=False)
  assert M.trained_parameter_count(no_kv, TINY) == 2 * 2 * 32 * 8
  # Heads 2 and 3 share KV group 1: their union trains that group's K/V slice once.
  both = M.mask_from_heads(TINY, [(1, 3), (1, 2)])
  assert M.trained_parameter_count(both, TINY) == (2 * 2 + 2) * 32 * 8


def test_neuron_masks():
  mask = M.mask_from_neurons(TINY, {0: [1, 5, 5], 2: range(10)})
  assert M.trained_parameter_count(mask, TINY) == (2 + 10) * 3 * 32
  gate = mask[M.matrix_label(0, "gating_linear")]
  assert gate.shape == (32, 64) and gate[:, 5].all() and not gate[:, 4].any()
  assert mask[M.matrix_label(0, "out_linear")][1].all()
  with pytest.raises(ValueError, match="0..63"):
    M.mask_from_neurons(TINY, {0: [64]})


def test_layouts_relayout_and_named_views():
  model = _loader_layout_model(TINY)
  label = M.matrix_label(1, "query")
  assert M.parameter_shape(model, label) != M.parameter_shape(TINY, label)
  from_config = M.mask_from_heads(TINY, [(1, 3)])
  from_model = M.mask_from_heads(model, [(1, 3)])
  with pytest.raises(M.MaskError, match="expected"):
    M.validate_mask(from_config, model)
  moved = M.relayout_mask(from_config, TINY, model)
  for key in from_model:
    np.testing.assert_array_equal(np.asarray(moved[key]), np.asarray(from_model[key]))
  named_a, named_b = M.mask_to_named(from_config, TINY), M.mask_to_named(from_model, model)
  np.testing.assert_array_equal(
      named_a[label].untag(*named_b[label].named_shape).unwrap(),
      named_b[label].untag(*named_b[label].named_shape).unwrap(),
  )
  text = treescope.render_to_text(named_a)
  assert "query_heads" in text and "embedder" in text


def test_save_load_roundtrip_is_atomic_and_layout_aware(tmp_path):
  model = _loader_layout_model(TINY)
  mask = M.union(TINY, M.mask_from_heads(TINY, [(0, 0)]), M.mask_from_units(TINY, [M.Unit(2, "mlp")]))
  path = tmp_path / "sub" / "mask.npz"
  M.save_mask(path, mask, TINY, {"method": "test"})
  assert os.listdir(path.parent) == ["mask.npz"]  # no temp file left behind
  loaded, meta = M.load_mask(path, TINY)
  assert meta["method"] == "test" and meta["trained_parameters"] == M.trained_parameter_count(mask, TINY)
  for key, value in mask.items():
    np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value))
  in_model_layout, _ = M.load_mask(path, model)
  M.validate_mask(in_model_layout, model)
  assert M.trained_parameter_count(in_model_layout, model) == meta["trained_parameters"]
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(M.MaskError, match="junk.npz"):
    M.load_mask(tmp_path / "junk.npz")


def test_baselines_are_seeded_and_budget_matched():
  flu = baselines.flu_mlps(TINY, [0, 1])
  budget = flu.trained_parameters
  assert budget == 2 * MLP_SIZE
  a = baselines.random_matrices(TINY, budget, seed=0)
  b = baselines.random_matrices(TINY, budget, seed=0)
  assert a.details["labels"] == b.details["labels"]
  others = {tuple(baselines.random_matrices(TINY, budget, seed=s).details["labels"]) for s in range(1, 6)}
  assert len(others | {tuple(a.details["labels"])}) > 1
  largest = max(int(np.prod(M.parameter_shape(TINY, l))) for l in M.editable_labels(TINY))
  assert budget <= a.trained_parameters < budget + largest
  r = baselines.random_mlps(TINY, 2, seed=3)
  assert r.trained_parameters == budget and len(r.details["layers"]) == 2
  assert r.details == baselines.random_mlps(TINY, 2, seed=3).details
  assert {tuple(baselines.random_mlps(TINY, 1, seed=s).details["layers"]) for s in range(10)} != {(0,)}
  assert baselines.all_mlps(TINY).trained_parameters == 3 * MLP_SIZE
  assert baselines.nonlocalized(TINY).trained_parameters == TINY.num_block_parameters()
  scores = {(0, "mlp_out"): 0.1, (1, "attn_out"): 5.0, (2, "mlp_out"): -1.0, (1, "mlp_in"): 0.5}
  built = baselines.build_baselines(TINY, [0, 1], seed=0, scores={"ap": scores, "ct": scores})
  assert set(built) == {"flu", "random", "random_mlps", "all_mlps", "nonlocalized", "ap", "ap_mlps", "ct", "ct_mlps"}
  assert built["ap_mlps"].details["units"] == ["mlp1", "mlp2"]
  assert built["ap"].details["units"][0] == "attn1"
  for result in built.values():
    assert result.trained_parameters == M.trained_parameter_count(result.mask, TINY)


def test_mask_overlap_and_coincidence_count_weights():
  mlp1 = M.mask_from_units(TINY, [M.Unit(1, "mlp")])
  mlp12 = M.mask_from_units(TINY, [M.Unit(1, "mlp"), M.Unit(2, "mlp")])
  head = M.mask_from_heads(TINY, [(0, 1)])
  half = M.mask_from_neurons(TINY, {1: range(32)})  # half of the 64 neurons
  size = M.unit_parameter_count(TINY, M.Unit(1, "mlp"))
  assert M.mask_overlap(mlp1, mlp12, TINY)["precision"] == 1.0
  assert M.mask_overlap(mlp1, mlp12, TINY)["recall"] == pytest.approx(0.5)
  assert M.mask_overlap(half, mlp1, TINY)["overlap"] == size // 2  # sub-tensor entries against whole tensors
  c = M.mask_coincidence({"a": mlp1, "b": mlp12, "c": head, "a_again": dict(mlp1), "half": half}, TINY)
  j = dict(zip(c["names"], c["jaccard"]))
  assert j["a"][1] == pytest.approx(0.5) and j["a"][2] == 0.0 and j["a"][3] == 1.0
  assert j["half"][0] == pytest.approx(0.5)
  assert c["identical"] == [["a", "a_again"]]
  assert c["trained_parameters"][:2] == [size, 2 * size]
