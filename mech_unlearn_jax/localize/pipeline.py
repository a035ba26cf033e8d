"""One call that localizes facts with every method and writes everything to a workdir.

`run_localization(spec, workdir)`:
  1. loads the model (a checkpoint spec, or a preset name for a random model),
  2. builds the fact prompts (sports: the standard one-shot template, 3-way sport
     candidates; CounterFact: the fact prompt, first token of the true vs the false
     target; "synthetic": random subjects for tests) and keeps the facts the model
     knows (`knowledge_threshold`),
  3. runs the requested methods: "fact_lookup" (FLU, `fact_lookup.py`), "ap"
     (attribution patching) and "ct" (causal tracing),
  4. writes, atomically:
       localization.json          summary: spec, data, chosen FLU layers, masks
       facts.json                 the facts used, in order, with their scores
       fact_lookup/               fact_lookup.json + probe_curve/extraction/enrichment PNGs
       scores/{method}.npz|.json  per-component scores
       masks/{name}.npz           FLU, baselines, AP/CT masks at the FLU budget
Masks are saved in the loaded model's own axis layout (see `masks.py`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mech_unlearn_jax import predict
from mech_unlearn_jax.batch import FactBatch, make_fact_batch, subject_token_span
from mech_unlearn_jax.data import facts as facts_lib
from mech_unlearn_jax.data import formats
from mech_unlearn_jax.evals import scoring
from mech_unlearn_jax.localize import attribution_patching as ap
from mech_unlearn_jax.localize import baselines as baselines_lib
from mech_unlearn_jax.localize import causal_tracing as ct
from mech_unlearn_jax.localize import corruption
from mech_unlearn_jax.localize import fact_lookup as fl
from mech_unlearn_jax.localize import masks as masks_lib
from mech_unlearn_jax.localize import probes as probes_lib
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import forward, loaders
from mech_unlearn_jax.models.transformer import CausalLM, build_transformer

METHODS = ("fact_lookup", "ap", "ct")
DATASETS = ("sports", "counterfact", "synthetic")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which facts to localize on.

  Attributes:
    dataset: "sports", "counterfact" or "synthetic" (random subjects; tests).
    path: table to read (sports: None = the embedded athletes table; CounterFact:
      required).
    knowledge_threshold: keep facts the model knows: sports p(true sport) normalized
      over the candidates, CounterFact full-vocab p(first true token), >= this; None
      keeps every fact.
    max_facts: read at most this many facts (file order) before filtering.
    max_known: keep at most this many known facts (file order).
    synthetic_size, synthetic_classes: size of the synthetic set.
  """

  dataset: str = "sports"
  path: str | None = None
  knowledge_threshold: float | None = 0.5
  max_facts: int | None = None
  max_known: int | None = None
  synthetic_size: int = 48
  synthetic_classes: int = 3

  def __post_init__(self):
    if self.dataset not in DATASETS:
      raise ValueError(f"data.dataset must be one of {DATASETS}, got {self.dataset!r}")
    if self.dataset == "counterfact" and not self.path:
      raise ValueError("data.path must name a CounterFact table for dataset 'counterfact'")


@dataclasses.dataclass(frozen=True)
class APSpec:
  max_prompts: int = 128
  batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class CTSpec:
  max_prompts: int = 64
  num_samples: int = 3
  prompts_per_call: int = 4


@dataclasses.dataclass(frozen=True)
class LocalizationSpec:
  """Everything `run_localization` needs.

  Attributes:
    model: "default", a checkpoint path (see `loaders.load_model`), or a "tiny-*"
      preset name from `models.config.PRESETS` (random weights from `model_seed`;
      tests).
    model_seed: init seed for preset models.
    data: the facts.
    methods: subset of `METHODS`.
    fact_lookup: FLU settings (rule, probes, patching).
    ap, ct: settings of the output-tracing methods.
    seed: seeds corruption and random baselines.
    baselines: also write the baseline masks.
    chunk_size: prompts per forward pass when scoring.
  """

  model: str = "default"
  model_seed: int = 0
  data: DataSpec = DataSpec()
  methods: tuple[str, ...] = METHODS
  fact_lookup: fl.FactLookupConfig = fl.FactLookupConfig()
  ap: APSpec = APSpec()
  ct: CTSpec = CTSpec()
  seed: int = 0
  baselines: bool = True
  chunk_size: int = 32

  def __post_init__(self):
    bad = [m for m in self.methods if m not in METHODS]
    if bad:
      raise ValueError(f"unknown localization methods {bad}; expected a subset of {METHODS}")
    if self.baselines and "fact_lookup" not in self.methods:
      raise ValueError("baselines are budget-matched to FLU: add 'fact_lookup' to methods")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LocalizationSpec":
    """Builds a spec from plain nested dicts (e.g. `ConfigDict.to_dict()`).

    Empty strings, empty tuples and 0 for the optional `max_*`/`layers` fields, and
    negative `knowledge_threshold`, `probe_saturation` or `max_gap`, mean "not set"
    (ConfigDicts cannot hold None and then take a value of another type).
    """
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown localization config keys {sorted(unknown)}")
    none_if_empty = lambda v: None if v in ("", (), [], None) else v
    none_if_zero = lambda v: None if not v else int(v)
    data = dict(d.pop("data", {}))
    data["path"] = none_if_empty(data.get("path"))
    for key in ("max_facts", "max_known"):
      if key in data:
        data[key] = none_if_zero(data[key])
    if data.get("knowledge_threshold", 0.5) is not None and data.get("knowledge_threshold", 0.5) < 0:
      data["knowledge_threshold"] = None
    flu = dict(d.pop("fact_lookup", {}))
    rule_fields = {f.name for f in dataclasses.fields(fl.FLURule)}
    probe_fields = {f.name: f for f in dataclasses.fields(probes_lib.ProbeConfig)}
    rule = {k: flu.pop(k) for k in list(flu) if k in rule_fields}
    probe = {k[len("probe_"):]: flu.pop(k) for k in list(flu) if k.startswith("probe_") and k[len("probe_"):] in probe_fields}
    for key in ("layers", "extraction_layers"):
      if key in rule:
        value = none_if_empty(rule[key])
        rule[key] = None if value is None else tuple(int(i) for i in value)
    if "probe_saturation" in rule and rule["probe_saturation"] is not None and rule["probe_saturation"] <= 0:
      rule["probe_saturation"] = None
    if "max_gap" in rule and rule["max_gap"] is not None and rule["max_gap"] < 0:
      rule["max_gap"] = None
    flu_cfg = fl.FactLookupConfig(
        rule=fl.FLURule(**rule), probe=probes_lib.ProbeConfig(**probe), **flu
    )
    return cls(
        data=DataSpec(**data),
        fact_lookup=flu_cfg,
        ap=APSpec(**dict(d.pop("ap", {}))),
        ct=CTSpec(**dict(d.pop("ct", {}))),
        methods=tuple(d.pop("methods", METHODS)),
        **d,
    )

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------
# Model and data.


def load_model_for(spec: LocalizationSpec) -> tuple[CausalLM, Any]:
  """(model, tokenizer or None): a "tiny-*" preset gives a random model, no tokenizer."""
  if spec.model.startswith("tiny") and spec.model in config_lib.PRESETS:
    return build_transformer(config_lib.get_preset(spec.model), jax.random.key(spec.model_seed)), None

  return loaders.load_model(spec.model), predict.load_tokenizer(spec.model)


@dataclasses.dataclass(frozen=True)
class FactSet:
  """Prompts ready for localization.

  Attributes:
    batch: clean prompts (answer = true attribute token, wrong = other candidates).
    labels: attribute class per prompt (probe targets).
    class_names: name of each class.
    subjects: subject per prompt.
    records: JSON-friendly per-fact info (kept facts only).
    num_read: facts read before the knowledge filter.
  """

  batch: FactBatch
  labels: np.ndarray
  class_names: tuple[str, ...]
  subjects: tuple[str, ...]
  records: list[dict[str, Any]]
  num_read: int


def _select(batch: FactBatch, index: np.ndarray) -> FactBatch:
  return jax.tree.map(lambda x: np.asarray(x)[index], batch)


def synthetic_facts(config: config_lib.TransformerConfig, spec: DataSpec, seed: int) -> FactSet:
  """Random "subjects" followed by a fixed relation; answers are fixed class tokens."""
  rng = np.random.default_rng(seed)
  vocab = config.vocab_size
  classes = spec.synthetic_classes
  answer_ids = np.arange(vocab - classes, vocab, dtype=np.int32)
  relation = [7, 8, 9]
  seqs, spans = [], []
  for _ in range(spec.synthetic_size):
    subject = rng.integers(16, vocab - classes, size=int(rng.integers(2, 5))).tolist()
    seqs.append([2, 5, 6] + subject + relation)
    spans.append((3, 3 + len(subject)))
  tokens, positions = forward.left_pad(seqs, multiple=8)
  mask = np.zeros(tokens.shape, dtype=bool)
  for row, (a, b) in enumerate(spans):
    offset = tokens.shape[1] - len(seqs[row])
    mask[row, offset + a : offset + b] = True
  labels = rng.integers(0, classes, size=spec.synthetic_size).astype(np.int32)
  wrong = np.stack([np.delete(answer_ids, l) for l in labels]).astype(np.int32)
  batch = FactBatch(tokens, positions, answer_ids[labels], wrong, mask)
  subjects = tuple(f"synthetic_{i}" for i in range(spec.synthetic_size))
  names = tuple(f"class_{c}" for c in range(classes))
  records = [{"subject": s, "label": names[l]} for s, l in zip(subjects, labels)]
  return FactSet(batch, labels, names, subjects, records, spec.synthetic_size)


def _with_locatable_subjects(tokenizer, facts: list, prompt_subjects: Sequence[tuple[str, str]]) -> list:
  """Facts whose subject starts and ends on token boundaries (others are logged, skipped)."""
  keep = []
  for fact, (prompt, subject) in zip(facts, prompt_subjects):
    try:
      subject_token_span(tokenizer, prompt, subject)
    except ValueError as e:
      logging.warning("skipping a fact: %s", e)
      continue
    keep.append(fact)
  return keep


def _sports_prompts(tokenizer, spec: DataSpec):
  facts = facts_lib.load_sports_facts(spec.path)
  if spec.max_facts:
    facts = facts[: spec.max_facts]
  fmt = formats.SportsTemplateFormat(name="standard", sports=facts_lib.SPORTS)
  ids = fmt.answer_token_ids(tokenizer)
  facts = _with_locatable_subjects(tokenizer, facts, [(fmt.format(f)[0].text, f.athlete) for f in facts])
  prompts = fmt.format_batch(facts)
  batch = make_fact_batch(
      tokenizer,
      [p.text for p in prompts],
      [p.subject for p in prompts],
      [ids[p.correct_index] for p in prompts],
      [[i for j, i in enumerate(ids) if j != p.correct_index] for p in prompts],
  )
  labels = np.asarray([p.correct_index for p in prompts], dtype=np.int32)
  records = [{"subject": f.athlete, "label": f.sport, "row_index": f.row_index} for f in facts]
  return batch, labels, tuple(facts_lib.SPORTS), records, "prob_normalized"


def _counterfact_prompts(tokenizer, spec: DataSpec):
  facts = facts_lib.load_counterfact(spec.path)
  if spec.max_facts:
    facts = facts[: spec.max_facts]
  facts = _with_locatable_subjects(tokenizer, facts, [(f.prompt, f.subject) for f in facts])
  true_ids = [formats.first_token_id(tokenizer, f.target_true) for f in facts]
  false_ids = [formats.first_token_id(tokenizer, f.target_false) for f in facts]
  batch = make_fact_batch(
      tokenizer, [f.prompt for f in facts], [f.subject for f in facts], true_ids,
      [[w] for w in false_ids],
  )
  # Probe classes: the true objects (many relations share few objects, e.g. languages).
  names = tuple(sorted({f.target_true.strip() for f in facts}))
  labels = np.asarray([names.index(f.target_true.strip()) for f in facts], dtype=np.int32)
  records = [
      {"subject": f.subject, "label": f.target_true.strip(), "prompt_id": f.prompt_id}
      for f in facts
  ]
  return batch, labels, names, records, "prob_full"


def build_facts(model: CausalLM, tokenizer, spec: LocalizationSpec) -> FactSet:
  """Prompts for `spec.data`, filtered to the facts the model knows."""
  data = spec.data
  if data.dataset == "synthetic":
    return synthetic_facts(model.config, data, spec.seed)
  if tokenizer is None:
    raise ValueError(
        f"dataset {data.dataset!r} needs a tokenizer; model {spec.model!r} is a random preset"
        " (use dataset 'synthetic')"
    )
  make = _sports_prompts if data.dataset == "sports" else _counterfact_prompts
  batch, labels, names, records, measure = make(tokenizer, data)
  num_read = batch.size
  scores = scoring.score_facts(model, batch, chunk_size=spec.chunk_size)
  prob = getattr(scores, measure)
  for record, p in zip(records, prob):
    record[measure] = float(p)
  keep = np.arange(batch.size)
  if data.knowledge_threshold is not None:
    keep = np.flatnonzero(prob >= data.knowledge_threshold)
  if data.max_known:
    keep = keep[: data.max_known]
  if keep.size < 4:
    raise ValueError(
        f"only {keep.size} of {num_read} facts pass knowledge_threshold="
        f"{data.knowledge_threshold}; localization needs more"
    )
  # Drop padding columns that only the removed prompts needed.
  sub = _select(batch, keep)
  width = int((np.asarray(sub.positions_BxL) >= 0).sum(axis=1).max())
  width = -(-width // 8) * 8
  sub = dataclasses.replace(
      sub,
      tokens_BxL=sub.tokens_BxL[:, -width:],
      positions_BxL=sub.positions_BxL[:, -width:],
      subject_mask_BxL=sub.subject_mask_BxL[:, -width:],
  )
  return FactSet(
      batch=sub,
      labels=labels[keep],
      class_names=names,
      subjects=tuple(records[i]["subject"] for i in keep),
      records=[records[i] for i in keep],
      num_read=num_read,
  )


def corrupt_tokens(model: CausalLM, tokenizer, batch: FactBatch, seed: int) -> np.ndarray:
  """Subject tokens replaced at random (the AP corruption; shared by FLU and AP)."""
  if tokenizer is None:
    return corruption.random_token_replacement(
        batch.tokens_BxL, batch.subject_mask_BxL, np.arange(16, model.config.vocab_size), seed
    )
  pool = corruption.ascii_token_ids(tokenizer, model.config.vocab_size)
  return corruption.corrupt_subjects(tokenizer, batch, pool, seed)


# ----------------------------------------------------------------------------------
# Writing.


def _write_npz(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  masks_lib.atomic_write_bytes(path, buf.getvalue())


def _site_scores_json(scores: Mapping[Any, np.ndarray]) -> dict[str, Any]:
  return {str(k): np.asarray(v).tolist() for k, v in sorted(scores.items())}


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x


# ----------------------------------------------------------------------------------
# The run.


def run_localization(spec: LocalizationSpec, workdir: str | os.PathLike) -> dict[str, Any]:
  """Loads, builds facts, localizes with `spec.methods`, writes results; returns the summary."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  model, tokenizer = load_model_for(spec)
  facts = build_facts(model, tokenizer, spec)
  logging.info("localizing on %d of %d facts", facts.batch.size, facts.num_read)
  fl.atomic_write_json(workdir / "facts.json", {"class_names": list(facts.class_names), "facts": facts.records})
  corrupt = corrupt_tokens(model, tokenizer, facts.batch, spec.seed)
  summary: dict[str, Any] = {
      "spec": spec.to_json(),
      "model_config": dataclasses.asdict(model.config),
      "num_facts_read": facts.num_read,
      "num_facts_used": facts.batch.size,
      "class_counts": {n: int((facts.labels == i).sum()) for i, n in enumerate(facts.class_names)},
      "timings_s": {},
  }
  method_scores: dict[str, dict[str, dict[Any, np.ndarray]]] = {}

  if "fact_lookup" in spec.methods:
    t = time.time()
    result = fl.run_fact_lookup(
        model, facts.batch, facts.labels, len(facts.class_names), spec.fact_lookup, corrupt
    )
    fl.save_evidence(
        result, workdir / "fact_lookup",
        extra={"model": spec.model, "dataset": spec.data.dataset, "num_facts": facts.batch.size},
        title=f"{spec.model}, {spec.data.dataset}",
    )
    _write_npz(workdir / "scores" / "fact_lookup.npz", {
        "enrichment": result.enrichment,
        "extraction_direct": result.patching.extraction_direct,
        "extraction_total": result.patching.extraction_total,
        "probe_subject_test": result.probe_subject.test_accuracy,
        "probe_subject_train": result.probe_subject.train_accuracy,
        "probe_final_test": result.probe_final.test_accuracy,
        "probe_final_train": result.probe_final.train_accuracy,
    })
    summary["fact_lookup"] = {
        "layers": list(result.layers),
        "extraction_layers": list(result.extraction_layers),
        "trace": _jsonable(result.trace),
    }
    summary["timings_s"]["fact_lookup"] = time.time() - t

  if "ap" in spec.methods:
    t = time.time()
    n = min(facts.batch.size, spec.ap.max_prompts)
    res = ap.attribution_patching(
        model, facts.batch.slice(0, n), corrupt[:n], ap.APConfig(batch_size=spec.ap.batch_size)
    )
    scores = res.as_numpy()
    method_scores["ap"] = {
        "reference": {s: v for s, v in scores.items() if s.kind in ("head_out", "mlp_out")},
        "per_matrix": {s: v for s, v in scores.items() if s.kind in ap.MATRIX_SITES.values()},
    }
    _write_npz(workdir / "scores" / "ap.npz", {str(s): v for s, v in scores.items()})
    fl.atomic_write_json(workdir / "scores" / "ap.json", {
        "clean_metric": res.clean_metric, "corrupt_metric": res.corrupt_metric,
        "num_prompts": n, "scores": _site_scores_json(scores),
    })
    summary["timings_s"]["ap"] = time.time() - t

  if "ct" in spec.methods:
    t = time.time()
    n = min(facts.batch.size, spec.ct.max_prompts)
    res = ct.causal_tracing(model, facts.batch.slice(0, n), ct.CTConfig(
        num_samples=spec.ct.num_samples, prompts_per_call=spec.ct.prompts_per_call, seed=spec.seed,
    ))
    scores = res.scores()
    method_scores["ct"] = {"reference": scores, "per_matrix": scores}
    _write_npz(workdir / "scores" / "ct.npz", {str(s): v for s, v in scores.items()})
    fl.atomic_write_json(workdir / "scores" / "ct.json", {
        "noise_std": res.noise_std, "num_prompts": n, "scores": _site_scores_json(scores),
    })
    summary["timings_s"]["ct"] = time.time() - t

  mask_info = {}
  if "fact_lookup" in spec.methods:
    built = (
        baselines_lib.build_baselines(
            model, summary["fact_lookup"]["layers"], spec.seed,
            {m: s["reference"] for m, s in method_scores.items()},
        )
        if spec.baselines
        else {"flu": baselines_lib.flu_mlps(model, summary["fact_lookup"]["layers"])}
    )
    budget = built["flu"].trained_parameters
    for method, s in method_scores.items():
      built[f"{method}_per_matrix"] = baselines_lib.output_tracing(
          f"{method}_per_matrix", s["per_matrix"], model, budget, mode="per_matrix"
      )
    for name, result in built.items():
      result.save(workdir / "masks" / f"{name}.npz", model)
      mask_info[name] = {"trained_parameters": result.trained_parameters, "units": result.details["units"],
                         "labels": len(result.details["labels"])}
  summary["masks"] = mask_info
  summary["timings_s"]["total"] = time.time() - started
  fl.atomic_write_json(workdir / "localization.json", _jsonable(summary))
  return summary
