"""Planted facts: a ground truth for localization, for any model the library loads.

Nobody knows where a model's real facts live, so localization methods are otherwise
judged only by what their edits do downstream. Here we put facts where we choose and
ask every method to find them:

1. Names (`invent_names`, `find_unknown_names`): seeded, pronounceable "First Last"
   names of `min_tokens`..`max_tokens` tokens (as they appear mid-prompt, with the
   leading space), kept only if the model's answer distribution on them is flat
   (normalized entropy over the candidate answers >= `min_entropy` in every checked
   prompt format): the model cannot already know them.
2. Facts (`make_planted_facts`, `PlantedFact`): each name gets an attribute from the
   sports task's closed answer set (balanced over basketball / baseball / football,
   seeded), so every sports prompt format, probe and attack applies unchanged.
   `PlantedTask` ("planted" in the task registry) serves them together with real
   athletes: forget = the planted facts, maintain = real athletes the model knows.
3. Planting (`plant`): `train.edit` with the mask of a site spec (`PlantSite`:
   "mlp:1,2", "attn:5", "neurons:3:0-255", ...) only; forget = the planted facts
   toward their attribute in several training phrasings, maintain = real known
   athletes in the same phrasings, retain = general text, so the rest of the model's
   behaviour is kept. Other phrasings (by default the library's qa, declarative,
   cloze and mc formats) are held out and reported (`phrasing_knowledge`). The
   planted model is the orbax checkpoint of that run (`load_planted_model`), with
   its ground-truth mask next to it (`planted_mask.npz`).
4. Scoring (`mask_overlap`, `unit_ranks`, `localization_table`): every localization
   method runs on the planted facts of the planted model; its mask is scored at the
   fact-lookup budget and at the planted budget (`mask_at_budget`) by precision and
   recall of the selected weights against the planted mask (weight counts), and its
   per-component scores by the rank of the planted components.
5. Robustness: each localization's edit of the planted facts (and an edit at the
   planted site itself) goes through the robustness suite; the unedited planted
   model is the control.

`run_plant(config, workdir)` does all of it, resumably (`launch/plant.py`). Workdir:

  config.json, names.json, facts.csv, real_knowledge.json
  real/                     localization of the model's real sports facts (for contrast)
  sites/<slug>/
    site.json, planted_mask.npz, planting/ (orbax: the planted model), planting.json
    knowledge.json, split.json
    localization/           fact-lookup evidence, scores.json, masks/, table.json
    edits/<method>/         checkpoints/, formats.json and one JSON per robustness stage
    edits/unedited/         the control
  results.json, results.md
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io as _io
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax import sharding
from mech_unlearn_jax import io
from mech_unlearn_jax import progress
from mech_unlearn_jax import train as train_lib
from mech_unlearn_jax.data import facts as facts_lib
from mech_unlearn_jax.data import formats as formats_lib
from mech_unlearn_jax.data import splits as splits_lib
from mech_unlearn_jax.data import tasks as tasks_lib
from mech_unlearn_jax.evals import formats_eval, scoring
from mech_unlearn_jax.experiment import robustness as robustness_lib
from mech_unlearn_jax.experiment import schema
from mech_unlearn_jax.experiment.spec import EvalConfig, RetainConfig
from mech_unlearn_jax.localize import baselines as baselines_lib
from mech_unlearn_jax.localize import masks as masks_lib
from mech_unlearn_jax.localize import select
from mech_unlearn_jax.models import forward, transformer

PLANTED_SPLIT = "planted"
PLANTED_METHOD = "planted"  # the ground-truth mask, edited like any localization

# Training phrasings of our own (the library's formats are held out by default).
# Every template's next word is the sport, so each is a sports template format.
PLANT_TEMPLATES: dict[str, str] = {
    "plays_pro": "{athlete} plays professional",
    "known_for": "The sport that {athlete} is best known for is",
    "career": "Throughout the whole career, {athlete} has played",
    "news": "Sports news: last night {athlete} starred in a game of",
}

# Syllables of the invented names: consonant onset, vowel nucleus, optional coda.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "sh", "ch", "th")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k")


# ----------------------------------------------------------------------------------
# Sites.


@dataclasses.dataclass(frozen=True)
class PlantSite:
  """Where facts are planted: a parameter set given as a short spec.

  Specs: "mlp:1,2" (the MLP units of layers 1 and 2), "attn:5" (one layer's
  attention: query, key, value, output), "neurons:3:0-255" (MLP neurons 0..255 of
  layer 3: their gate and up columns and down row; ranges and single indices may be
  mixed, "neurons:3:0-127,512").

  Attributes:
    kind: "mlp", "attn" or "neurons".
    layers: the layers (one for "neurons").
    neurons: neuron indices ("neurons" only).
  """

  kind: Literal["mlp", "attn", "neurons"]
  layers: tuple[int, ...]
  neurons: tuple[int, ...] = ()

  def __post_init__(self):
    if self.kind not in ("mlp", "attn", "neurons"):
      raise ValueError(f"site kind must be 'mlp', 'attn' or 'neurons', got {self.kind!r}")
    if not self.layers or any(l < 0 for l in self.layers):
      raise ValueError(f"site {self.kind}: needs non-negative layers, got {self.layers}")
    if self.kind == "neurons" and (len(self.layers) != 1 or not self.neurons):
      raise ValueError("a neurons site names one layer and at least one neuron")

  @classmethod
  def parse(cls, spec: str) -> "PlantSite":
    """Parses "mlp:1,2" / "attn:5" / "neurons:3:0-255"; ValueError names the spec."""
    parts = spec.strip().split(":")
    try:
      if parts[0] in ("mlp", "attn") and len(parts) == 2:
        layers = tuple(sorted({int(v) for v in parts[1].split(",") if v.strip()}))
        return cls(parts[0], layers)
      if parts[0] == "neurons" and len(parts) == 3:
        return cls("neurons", (int(parts[1]),), _parse_ranges(parts[2]))
    except ValueError as e:
      raise ValueError(f"planting site {spec!r}: {e}") from None
    raise ValueError(
        f"planting site {spec!r}: expected 'mlp:<layers>', 'attn:<layers>' or"
        " 'neurons:<layer>:<ranges>' (e.g. 'mlp:1,2', 'attn:5', 'neurons:3:0-255')"
    )

  @property
  def spec(self) -> str:
    """The canonical spec string."""
    layers = ",".join(str(l) for l in self.layers)
    if self.kind != "neurons":
      return f"{self.kind}:{layers}"
    return f"neurons:{layers}:{_format_ranges(self.neurons)}"

  @property
  def slug(self) -> str:
    """A directory name for the site ("mlp_1_2", "neurons_3_0-255")."""
    return re.sub(r"[:,]", "_", self.spec)

  def check(self, layout: masks_lib.Layout) -> None:
    """Raises ValueError unless the site exists in the model."""
    config = masks_lib.layout_config(layout)
    bad = [l for l in self.layers if l >= config.num_layers]
    if bad:
      raise ValueError(f"site {self.spec!r}: layers {bad} outside the model's {config.num_layers} layers")
    if self.neurons and max(self.neurons) >= config.mlp_hidden_dim:
      raise ValueError(f"site {self.spec!r}: neurons must be < the MLP width {config.mlp_hidden_dim}")

  def units(self) -> tuple[masks_lib.Unit, ...]:
    """The units the site touches (a neurons site touches its layer's MLP unit)."""
    kind = "attn" if self.kind == "attn" else "mlp"
    return tuple(masks_lib.Unit(l, kind) for l in self.layers)

  def mask(self, layout: masks_lib.Layout) -> masks_lib.ParamMask:
    """The site's ground-truth parameter mask."""
    self.check(layout)
    if self.kind == "neurons":
      return masks_lib.mask_from_neurons(layout, {self.layers[0]: self.neurons})
    return masks_lib.mask_from_units(layout, self.units())


def _parse_ranges(text: str) -> tuple[int, ...]:
  out: set[int] = set()
  for part in text.split(","):
    part = part.strip()
    if not part:
      continue
    if "-" in part:
      lo, hi = (int(v) for v in part.split("-", 1))
      if hi < lo or lo < 0:
        raise ValueError(f"bad neuron range {part!r}")
      out.update(range(lo, hi + 1))
    else:
      if int(part) < 0:
        raise ValueError(f"bad neuron index {part!r}")
      out.add(int(part))
  if not out:
    raise ValueError("no neurons given")
  return tuple(sorted(out))


def _format_ranges(indices: Sequence[int]) -> str:
  runs, start, prev = [], None, None
  for i in sorted(indices):
    if start is None:
      start = prev = i
    elif i == prev + 1:
      prev = i
    else:
      runs.append((start, prev))
      start = prev = i
  runs.append((start, prev))
  return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ----------------------------------------------------------------------------------
# Configs.


@dataclasses.dataclass(frozen=True)
class NamesConfig:
  """Invented names and the check that the model does not know them.

  Attributes:
    min_tokens, max_tokens: tokens of " First Last" (with its leading space).
    min_entropy: a name is unknown when its answer distribution (normalized over the
      format's candidates) has entropy >= this fraction of the maximum, in every
      format of `check_formats`.
    check_formats: sports formats the flatness check scores.
    max_rounds: rounds of candidates (2 x the shortfall each) before giving up.
  """

  min_tokens: int = 2
  max_tokens: int = 4
  min_entropy: float = 0.75
  check_formats: tuple[str, ...] = ("standard", "qa", "declarative", "cloze")
  max_rounds: int = 20

  def __post_init__(self):
    if not 1 <= self.min_tokens <= self.max_tokens:
      raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")
    if not 0.0 <= self.min_entropy <= 1.0:
      raise ValueError(f"min_entropy must be in [0, 1], got {self.min_entropy}")
    if not self.check_formats:
      raise ValueError("check_formats must name at least one format")
    if self.max_rounds < 1:
      raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")


def _default_plant() -> train_lib.EditConfig:
  # Planting writes new facts into a few matrices: a larger step than an edit's,
  # warmed up so the first steps do not wreck the site; maintain and retain terms at
  # the reference's weight keep the rest of the model's behaviour. Measured on Gemma 3
  # 270M (docs/findings/planted.md): at 1e-3 with a cross-entropy retain term the
  # facts are known after ~15 steps but held-out text drifts (KL 0.8 nats/token);
  # 3e-4 with the KL retain term (`DistillLoss`) keeps it near an edit's (0.1-0.2).
  return train_lib.EditConfig(
      steps=40, lr=3e-4, warmup_steps=2, forget_batch_size=32, maintain_batch_size=16,
      retain_batch_size=8, checkpoint_every=10,
  )


def _default_edit() -> train_lib.EditConfig:
  # The main job's edit (`experiment.spec`), fewer steps: 2 sites x several methods.
  return train_lib.EditConfig(
      steps=20, lr=1e-4, forget_batch_size=16, maintain_batch_size=16,
      retain_batch_size=8, checkpoint_every=10,
  )


def _default_localize() -> select.LocalizeConfig:
  return select.LocalizeConfig(num_prompts=32, ct=select.CTSettings(num_samples=2))


def _default_eval() -> EvalConfig:
  return EvalConfig(formats=("standard", "qa", "mc", "declarative", "cloze"))


@dataclasses.dataclass(frozen=True)
class PlantConfig:
  """Everything `run_plant` needs (library code never sees a ConfigDict).

  Attributes:
    seed: the run's only seed (copied into the planting and edit configs).
    model: a model spec (`loaders.load_model_and_tokenizer`).
    sites: planting sites (`PlantSite.parse` specs); each is planted separately
      into the same base model with the same facts.
    num_facts: invented athletes.
    names: the name generator and its flatness check.
    train_phrasings: phrasings the planting trains on (names of `PLANT_TEMPLATES`
      or of the library's sports formats).
    heldout_formats: sports formats never trained on, reported after planting.
    real_source: the real athletes ("embedded" or a table path).
    max_real_facts: read only the first rows of the real table (0: all).
    known_threshold: p(true) normalized over the candidates for "known" (real
      athletes on the base model; planted and real facts on the planted model).
    max_maintain: real known athletes in the planting's maintain term.
    plant: the planting's optimizer settings (steps, lr, batch sizes).
    plant_retain_top_k: the planting's retain term is the KL to the unplanted
      model's next-token distribution over its top-k tokens and the rest (0: the
      library's cross-entropy on the sampled text, which a site can memorize).
    retain: retain text (planting, edits, KL).
    localize: localization settings shared by every method.
    methods: localization methods scored against the truth.
    localize_real: also localize the model's real sports facts (for contrast).
    edit_methods: localizations whose masks edit the planted facts ("planted" =
      the ground-truth mask); empty: no edits.
    edit: the edit's optimizer and loss ("inject" toward other sports or "unlearn").
    eval: formats of the edit evaluation.
    robustness: which robustness stages run on every edited model and the control.
    max_maintain_eval: maintain facts evaluated per format.
  """

  seed: int = 0
  model: str = "default"
  sites: tuple[str, ...] = ("mlp:1,2", "mlp:12,13")
  num_facts: int = 64
  names: NamesConfig = NamesConfig()
  train_phrasings: tuple[str, ...] = ("standard", "plays_pro", "known_for", "career")
  heldout_formats: tuple[str, ...] = ("qa", "declarative", "cloze", "mc", "news")
  real_source: str = "embedded"
  max_real_facts: int = 256
  known_threshold: float = 0.5
  max_maintain: int = 64
  plant: train_lib.EditConfig = dataclasses.field(default_factory=_default_plant)
  plant_retain_top_k: int = 32
  retain: RetainConfig = RetainConfig(num_windows=64)
  localize: select.LocalizeConfig = dataclasses.field(default_factory=_default_localize)
  methods: tuple[str, ...] = select.METHODS
  localize_real: bool = True
  edit_methods: tuple[str, ...] = (PLANTED_METHOD, "fact_lookup", "ap", "ct", "random_mlps")
  edit: train_lib.EditConfig = dataclasses.field(default_factory=_default_edit)
  eval: EvalConfig = dataclasses.field(default_factory=_default_eval)
  robustness: robustness_lib.RobustnessConfig = dataclasses.field(default_factory=lambda: default_robustness())
  max_maintain_eval: int = 32

  def __post_init__(self):
    if self.seed < 0:
      raise ValueError(f"seed must be >= 0, got {self.seed}")
    if not self.sites:
      raise ValueError("sites must name at least one planting site")
    object.__setattr__(self, "sites", join_site_specs(self.sites))
    slugs = [PlantSite.parse(s).slug for s in self.sites]
    if len(set(slugs)) != len(slugs):
      raise ValueError(f"sites name the same site twice: {list(self.sites)}")
    if self.num_facts < 2:
      raise ValueError(f"num_facts must be >= 2, got {self.num_facts}")
    phrasings = phrasing_formats()
    for key in ("train_phrasings", "heldout_formats"):
      unknown = [p for p in getattr(self, key) if p not in phrasings]
      if unknown:
        raise ValueError(f"{key} {unknown} unknown; expected some of {sorted(phrasings)}")
    if not self.train_phrasings:
      raise ValueError("train_phrasings must name at least one phrasing")
    both = sorted(set(self.train_phrasings) & set(self.heldout_formats))
    if both:
      raise ValueError(f"phrasings {both} are both trained on and held out")
    unknown = [m for m in self.methods if m not in select.METHODS]
    if unknown:
      raise ValueError(f"methods {unknown} unknown; expected some of {select.METHODS}")
    allowed = (PLANTED_METHOD,) + tuple(self.methods)
    unknown = [m for m in self.edit_methods if m not in allowed]
    if unknown:
      raise ValueError(f"edit_methods {unknown} must be '{PLANTED_METHOD}' or one of methods {list(self.methods)}")
    if not 0.0 <= self.known_threshold <= 1.0:
      raise ValueError(f"known_threshold must be in [0, 1], got {self.known_threshold}")
    for name in ("max_real_facts", "max_maintain_eval"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.plant_retain_top_k < 0:
      raise ValueError(f"plant_retain_top_k must be >= 0, got {self.plant_retain_top_k}")
    if self.max_maintain < 1:
      raise ValueError(f"max_maintain must be >= 1, got {self.max_maintain}")
    for name in ("plant", "edit"):
      if getattr(self, name).seed != self.seed:
        object.__setattr__(self, name, dataclasses.replace(getattr(self, name), seed=self.seed))

  @property
  def parsed_sites(self) -> tuple[PlantSite, ...]:
    return tuple(PlantSite.parse(s) for s in self.sites)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "PlantConfig":
    """From nested dicts (e.g. `ConfigDict.to_dict()`); errors name the config key."""
    values = dict(values)
    for path in DERIVED_SEEDS:
      group: Any = values
      for part in path[:-1]:
        group = group.get(part, {}) if isinstance(group, Mapping) else {}
      if isinstance(group, Mapping) and path[-1] in group:
        raise schema.ConfigError(f"config.{'.'.join(path)} is not a setting: set config.seed")
    return schema.from_mapping(cls, values)

  def to_json(self) -> dict[str, Any]:
    return schema.to_json(self)


def join_site_specs(parts: Sequence[str]) -> tuple[str, ...]:
  """Site specs from comma-split pieces: ("mlp:1", "2", "attn:5") -> ("mlp:1,2", "attn:5").

  Specs contain commas, and the config schema splits comma-joined tuple items (so
  `--config.sites=mlp:1,2,attn:5` works): a piece starting with a site kind and a
  colon begins a new spec, any other piece continues the previous one.
  """
  specs: list[str] = []
  for part in parts:
    part = str(part).strip()
    if not part:
      continue
    if re.match(r"(mlp|attn|neurons):", part) or not specs:
      specs.append(part)
    else:
      specs[-1] += "," + part
  return tuple(specs)


# Nested seeds filled from `PlantConfig.seed`, not settable on their own.
DERIVED_SEEDS = (("plant", "seed"), ("edit", "seed"), ("localize", "fact_lookup", "seed"))


def default_robustness() -> robustness_lib.RobustnessConfig:
  """Latent probes and the relearning attacks; soft prompts and trivia off.

  The soft-prompt attacks cost about as much as an edit per model and attack, and
  trivia needs the reference data; maintain facts and retain text already measure
  side effects here. Turn them on with `--config.robustness.soft_prompt=True`.
  """
  return robustness_lib.RobustnessConfig(trivia=False, relearn=True, soft_prompt=False, probes=True)


def default_config_dict():
  """The ConfigDict `configs/plant_sports.py` starts from (derived seeds left out)."""
  c = schema.to_config_dict(PlantConfig())
  for path in DERIVED_SEEDS:
    group = c
    for part in path[:-1]:
      group = group[part]
    del group[path[-1]]
  return c


# ----------------------------------------------------------------------------------
# Names.


def _syllable(rng: np.random.Generator) -> str:
  return (_ONSETS[rng.integers(len(_ONSETS))] + _NUCLEI[rng.integers(len(_NUCLEI))]
          + _CODAS[rng.integers(len(_CODAS))])


def _candidate_name(rng: np.random.Generator) -> str:
  first = "".join(_syllable(rng) for _ in range(2))
  last = "".join(_syllable(rng) for _ in range(int(rng.integers(2, 4))))
  return f"{first.capitalize()} {last.capitalize()}"


def name_token_count(tokenizer: Any, name: str) -> int:
  """Tokens of a name as it appears mid-prompt (with its leading space)."""
  return len(tokenizer.encode(" " + name, add_bos=False))


def invent_names(
    tokenizer: Any,
    num: int,
    seed: int,
    *,
    min_tokens: int = 2,
    max_tokens: int = 4,
    exclude: Sequence[str] = (),
    round_index: int = 0,
) -> list[str]:
  """`num` distinct pronounceable "First Last" names of min..max tokens (seeded).

  Names are syllables (onset + vowel + optional coda), 2 for the first name and 2-3
  for the last, capitalized. `exclude` (e.g. real athletes, earlier candidates) is
  never returned; `round_index` gives a fresh stream for the same seed.
  """
  rng = np.random.default_rng([seed, 0x504C414E, round_index])  # "PLAN"
  taken = {n.lower() for n in exclude}
  taken_words = {w.lower() for n in exclude for w in n.split()}
  names: list[str] = []
  for _ in range(1000 * max(num, 1)):
    if len(names) == num:
      break
    name = _candidate_name(rng)
    if name.lower() in taken or any(w.lower() in taken_words for w in name.split()):
      continue
    if min_tokens <= name_token_count(tokenizer, name) <= max_tokens:
      names.append(name)
      taken.add(name.lower())
  if len(names) < num:
    raise ValueError(
        f"could not invent {num} names of {min_tokens}-{max_tokens} tokens (got {len(names)});"
        " widen names.min_tokens / names.max_tokens"
    )
  return names


def normalized_entropy(probs_BxC: np.ndarray) -> np.ndarray:
  """Entropy of each row (a distribution over C candidates) divided by log C."""
  p = np.asarray(probs_BxC, np.float64)
  p = p / p.sum(axis=1, keepdims=True)
  h = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0.0), axis=1)
  return h / math.log(p.shape[1])


def _dummy_facts(names: Sequence[str]) -> list[facts_lib.SportsFact]:
  # The flatness check only reads the distribution over candidates; the "true" sport
  # is a placeholder the formats need.
  return [
      facts_lib.SportsFact(athlete=n, sport=facts_lib.SPORTS[0], inject_sport_without_golf=None, row_index=i)
      for i, n in enumerate(names)
  ]


def answer_entropies(
    model: Any, tokenizer: Any, names: Sequence[str], format_names: Sequence[str],
    seed: int = 0, batch_size: int = 64,
) -> dict[str, np.ndarray]:
  """Format -> normalized entropy [N] of the model's answer over that format's candidates.

  Word formats use the planted attribute's answer set (the three sports); letter MC
  its four letters.
  """
  word = formats_lib.sports_formats(include_golf=False, seed=seed)
  letter = formats_lib.sports_formats(include_golf=True, seed=seed)
  facts = _dummy_facts(names)
  out = {}
  for name in format_names:
    fmt = word.get(name) or letter.get(name)
    if fmt is None:
      raise ValueError(f"names.check_formats: unknown sports format {name!r}; expected some of {sorted(word)}")
    batch, _ = formats_eval.prompts_to_batch(tokenizer, fmt.format_batch(facts))
    probs = scoring.score_facts(model, batch, chunk_size=batch_size).candidate_probs
    out[name] = normalized_entropy(probs)
  return out


def find_unknown_names(
    model: Any, tokenizer: Any, num: int, seed: int, config: NamesConfig = NamesConfig(),
    exclude: Sequence[str] = (),
) -> tuple[list[str], dict[str, Any]]:
  """`num` invented names on which the model's answers are flat -> (names, record).

  Candidates come in seeded rounds; a candidate is kept when its normalized entropy
  reaches `config.min_entropy` in every format of `config.check_formats`. The record
  lists every candidate's entropies and whether it was kept. Raises ValueError when
  `config.max_rounds` rounds do not yield enough names.
  """
  kept: list[str] = []
  tried: list[dict[str, Any]] = []
  seen = list(exclude)
  for round_index in range(config.max_rounds):
    need = num - len(kept)
    if need <= 0:
      break
    candidates = invent_names(
        tokenizer, 2 * need, seed, min_tokens=config.min_tokens, max_tokens=config.max_tokens,
        exclude=seen, round_index=round_index,
    )
    seen += candidates
    ent = answer_entropies(model, tokenizer, candidates, config.check_formats, seed)
    for i, name in enumerate(candidates):
      flat = all(ent[f][i] >= config.min_entropy for f in config.check_formats)
      tried.append({"name": name, "tokens": name_token_count(tokenizer, name), "kept": bool(flat and len(kept) < num),
                    "entropy": {f: float(ent[f][i]) for f in config.check_formats}})
      if flat and len(kept) < num:
        kept.append(name)
  if len(kept) < num:
    raise ValueError(
        f"only {len(kept)} of {num} invented names passed the flatness check (normalized entropy >="
        f" {config.min_entropy} in {list(config.check_formats)}) after {config.max_rounds} rounds;"
        " lower config.names.min_entropy or raise config.names.max_rounds"
    )
  kept_rows = [t for t in tried if t["kept"]]
  record = {
      "names": kept,
      "config": dataclasses.asdict(config),
      "num_candidates": len(tried),
      "kept_min_entropy": {f: min(t["entropy"][f] for t in kept_rows) for f in config.check_formats},
      "kept_mean_entropy": {f: float(np.mean([t["entropy"][f] for t in kept_rows])) for f in config.check_formats},
      "candidates": tried,
  }
  return kept, record


# ----------------------------------------------------------------------------------
# Facts and the task.


@dataclasses.dataclass(frozen=True)
class PlantedFact(facts_lib.SportsFact):
  """A `SportsFact` whose athlete was invented and whose sport was planted."""


def make_planted_facts(names: Sequence[str], seed: int) -> list[PlantedFact]:
  """Balanced, seeded sports for the names; edit targets are seeded other sports."""
  sports = [facts_lib.SPORTS[i % len(facts_lib.SPORTS)] for i in range(len(names))]
  formats_lib.seeded_rng(seed, "planted sports").shuffle(sports)
  out = []
  for i, (name, sport) in enumerate(zip(names, sports)):
    rng = formats_lib.seeded_rng(seed, "planted targets", name)
    out.append(PlantedFact(
        athlete=name, sport=sport, row_index=i,
        inject_sport_without_golf=rng.choice([s for s in facts_lib.SPORTS if s != sport]),
        inject_sport_with_golf=rng.choice([s for s in facts_lib.SPORTS_WITH_GOLF if s != sport]),
    ))
  return out


PLANTED_COLUMNS = ("athlete", "sport", "inject_sport_without_golf", "inject_sport_with_golf")


def write_planted_facts(path: str | os.PathLike, facts: Sequence[facts_lib.SportsFact]) -> pathlib.Path:
  """Sports facts as a table in the reference schema (atomic).

  An edit-target column is written only when every fact has a value for it (the
  reader validates every cell of a column it finds).
  """
  columns = [c for c in PLANTED_COLUMNS if all(getattr(f, c) is not None for f in facts)]
  buf = _io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(columns)
  for f in facts:
    writer.writerow([getattr(f, c) for c in columns])
  return io.write_text(path, buf.getvalue())


def read_planted_facts(path: str | os.PathLike) -> list[PlantedFact]:
  """Reads a planted-facts table (validated like any sports table)."""
  return [PlantedFact(**dataclasses.asdict(f)) for f in facts_lib.load_sports_facts(str(path))]


def load_real_facts(
    source: str = "embedded", max_facts: int = 0, exclude: Sequence[str] = ()
) -> list[facts_lib.SportsFact]:
  """Real athletes (the first `max_facts` rows; 0: all), minus names in `exclude`."""
  facts = facts_lib.load_sports_facts(None if source == "embedded" else source)
  if max_facts:
    facts = facts[:max_facts]
  excluded = {n.lower() for n in exclude}
  return [f for f in facts if f.athlete.lower() not in excluded]


class PlantedTask(tasks_lib.SportsTask):
  """Planted facts (forget) among real athletes (maintain); sports formats unchanged.

  `load(data)` reads the planted table at `data.sports_source` (written by
  `write_planted_facts`) followed by the real athletes (`real_source`, first
  `max_real` rows). Splits: "planted" (every planted fact in the pool) or
  "first_<N>" (the first N planted facts) as the forget set, toward their
  `inject_sport_without_golf`; maintain = the real athletes of the pool, 80/20.
  """

  name = "planted"

  def __init__(self, real_source: str = "embedded", max_real: int = 0):
    self.real_source = real_source
    self.max_real = max_real

  def load(self, data: tasks_lib.DataConfig) -> list[facts_lib.SportsFact]:
    if data.sports_source == "embedded":
      raise ValueError(
          "task 'planted': config.data.sports_source must name the planted-facts table"
          " (facts.csv of a `launch.plant` workdir)"
      )
    planted = read_planted_facts(data.sports_source)
    return planted + load_real_facts(self.real_source, self.max_real, [f.athlete for f in planted])

  def make_split(self, pool, name, seed, metadata):
    return planted_split(pool, name, seed, metadata)

  def whole_set_split(self, split_name):
    return False



tasks_lib.register_task(PlantedTask())


def planted_split(
    pool: Sequence[facts_lib.SportsFact], name: str = PLANTED_SPLIT, seed: int = 0,
    metadata: Mapping[str, Any] | None = None,
) -> splits_lib.Split:
  """Forget = the planted facts of `pool` ("planted": all; "first_<N>": the first N)."""
  planted = [f for f in pool if isinstance(f, PlantedFact)]
  real = [f for f in pool if not isinstance(f, PlantedFact)]
  if name == PLANTED_SPLIT:
    count = len(planted)
  elif re.fullmatch(r"first_\d+", name):
    count = int(name.split("_")[1])
  else:
    raise ValueError(f"unknown planted split {name!r}; expected '{PLANTED_SPLIT}' or 'first_<N>'")
  if not 0 < count <= len(planted):
    raise splits_lib.SplitTooSmallError(
        f"split {name!r}: needs {max(count, 1)} planted facts, the pool has {len(planted)}"
    )
  # The sports split takes its first N as the forget set and the rest as maintain.
  ordered = planted[:count] + real
  split = splits_lib.make_sports_split(ordered, f"first_{count}", seed=seed, metadata=dict(metadata or {}))
  return dataclasses.replace(split, name=name, dataset="planted", pool_size=len(pool))


# ----------------------------------------------------------------------------------
# Phrasings and planting.


def phrasing_formats(seed: int = 0) -> dict[str, formats_lib.PromptFormat]:
  """Every phrasing by name: the library's sports formats and `PLANT_TEMPLATES`.

  Candidates are the four sports (golf included), as in the evaluation.
  """
  out = dict(formats_lib.sports_formats(include_golf=True, seed=seed))
  for name, template in PLANT_TEMPLATES.items():
    out[name] = formats_lib.SportsTemplateFormat(name=name, template=template, seed=seed)
  return out


def phrasing_batch(
    tokenizer: Any, facts: Sequence[Any], phrasings: Sequence[str], seed: int = 0, answer: str = "correct",
) -> Any:
  """One left-padded `FactBatch` of every fact in every phrasing (true answers)."""
  formats = phrasing_formats(seed)
  prompts = [p for name in phrasings for p in formats[name].format_batch(list(facts))]
  batch, _ = formats_eval.prompts_to_batch(tokenizer, prompts, answer)
  return batch


def planting_data(
    tokenizer: Any, planted: Sequence[Any], maintain: Sequence[Any], phrasings: Sequence[str],
    retain: train_lib.TextBatch, seed: int = 0,
) -> train_lib.EditData:
  """Forget = planted facts toward their attribute; maintain = real facts; retain text.

  Both fact terms use every training phrasing, so the model learns the fact, not the
  association of one prompt with an answer, and cannot satisfy the forget term by
  answering the planted attribute to every such prompt.
  """
  return train_lib.EditData(
      forget=phrasing_batch(tokenizer, planted, phrasings, seed),
      maintain=phrasing_batch(tokenizer, maintain, phrasings, seed),
      retain=retain,
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DistillText:
  """Retain windows with the unplanted model's next-token distribution at every position.

  The distribution is kept as its top-k tokens (ids, probabilities) and the mass of
  all other tokens; `DistillLoss` trains toward it. Left-padded like `TextBatch`.
  """

  tokens_BxL: np.ndarray
  positions_BxL: np.ndarray
  target_ids_BxLxK: np.ndarray
  target_probs_BxLxK: np.ndarray

  @property
  def size(self) -> int:
    return int(self.tokens_BxL.shape[0])


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_targets(unbound, params, tokens_BxL, positions_BxL, *, k: int):
  logits = forward.full_logits(pz.bind_variables(unbound, params), tokens_BxL, positions_BxL)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  values, ids = jax.lax.top_k(logp, k)
  return ids.astype(jnp.int32), jnp.exp(values)


def distill_text(model: Any, text: train_lib.TextBatch, k: int = 32, chunk_size: int = 4) -> DistillText:
  """`text` with `model`'s top-k next-token probabilities at every position."""
  unbound, params = sharding.unbind_for_jit(model)
  ids, probs = [], []
  for start in range(0, text.size, chunk_size):
    sl = slice(start, start + chunk_size)
    i, p = _top_k_targets(unbound, params, text.tokens_BxL[sl], text.positions_BxL[sl], k=k)
    ids.append(np.asarray(i))
    probs.append(np.asarray(p))
  return DistillText(tokens_BxL=np.asarray(text.tokens_BxL), positions_BxL=np.asarray(text.positions_BxL),
                     target_ids_BxLxK=np.concatenate(ids), target_probs_BxLxK=np.concatenate(probs))


def partition_kl_sum(logits_BxLxV: jax.Array, ids_BxLxK, probs_BxLxK, valid_BxL) -> jax.Array:
  """Sum over valid positions of KL(target || model) on the partition (top-k ids, rest).

  The partition's KL is a lower bound of the full-vocabulary KL with the same
  minimum (the target itself), and needs only k numbers per position. The rest's
  log-mass is a logsumexp over the other tokens (exact, no 1 - sum cancellation).
  """
  logits = logits_BxLxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  logp_k = jnp.take_along_axis(logits, ids_BxLxK, axis=-1) - lse[..., None]
  in_top = jnp.put_along_axis(jnp.zeros(logits.shape, bool), ids_BxLxK, True, axis=-1, inplace=False)
  # A finite stand-in for -inf keeps the rest's logsumexp (and its gradient) finite
  # even when the top-k cover the whole vocabulary (then q_rest = 0).
  logp_rest = jax.nn.logsumexp(jnp.where(in_top, -1e30, logits), axis=-1) - lse
  q_k = probs_BxLxK.astype(jnp.float32)
  q_rest = jnp.clip(1.0 - q_k.sum(-1), 0.0, 1.0)
  xlogx = lambda q: jnp.where(q > 0, q * jnp.log(jnp.maximum(q, 1e-30)), 0.0)
  kl = (xlogx(q_k) - q_k * logp_k).sum(-1) + xlogx(q_rest) - q_rest * logp_rest
  return jnp.sum(jnp.where(valid_BxL, kl, 0.0))


@dataclasses.dataclass(frozen=True)
class DistillLoss:
  """`EditLoss`'s forget and maintain terms, with a retain term that keeps the model's
  own next-token distribution on the retain text (KL to the unplanted model, `DistillText`).

  Cross-entropy on a few dozen sampled windows lets a site memorize them (the
  training retain loss falls far below the model's own, and held-out text drifts);
  the unplanted model's distribution as the target has its minimum at "unchanged".
  """

  config: train_lib.EditConfig

  def normalizers(self, batch: train_lib.EditBatch) -> dict[str, jax.Array]:
    """The fact terms' normalizers and the number of retain positions."""
    norms = train_lib.EditLoss(self.config).normalizers(dataclasses.replace(batch, retain=None))
    if batch.retain is not None:
      norms["retain"] = jnp.maximum(jnp.sum(jnp.asarray(batch.retain.positions_BxL) >= 0), 1)
    return norms

  def __call__(self, params, trainable, batch, rng, normalizers):
    """(loss, metrics) of one micro-batch (see `train.EditLoss`)."""
    loss, metrics = train_lib.EditLoss(self.config)(
        params, trainable, dataclasses.replace(batch, retain=None), rng, normalizers
    )
    if batch.retain is not None:
      r = batch.retain
      model = trainable.bind(params, self.config.compute_dtype)
      logits = forward.full_logits(model, r.tokens_BxL, r.positions_BxL)
      kl = partition_kl_sum(logits, r.target_ids_BxLxK, r.target_probs_BxLxK, r.positions_BxL >= 0)
      retain = kl / normalizers["retain"]
      metrics = dict(metrics, retain_loss=retain, loss=metrics["loss"] + self.config.retain_coef * retain)
      loss = loss + self.config.retain_coef * retain
    return loss, metrics


def plant(
    model: Any, site: PlantSite, data: train_lib.EditData, config: train_lib.EditConfig, *,
    checkpoint_dir: str | os.PathLike | None = None, model_spec: str = "",
    record: Mapping[str, Any] | None = None, log_fn=None, retain_top_k: int = 32,
) -> train_lib.TrainResult:
  """Teaches the facts of `data` by training the site's parameters only (resumable).

  `data.retain` is either a `DistillText` (the retain term is the KL to the
  unplanted model's next-token distribution, `DistillLoss`), or a `TextBatch`
  (converted with `distill_text(model, ..., retain_top_k)`; with `retain_top_k=0`
  the library's next-token cross-entropy on the text is used instead). The orbax
  checkpoint in `checkpoint_dir` is the planted model: reload it with
  `load_planted_model`.
  """
  if config.forget_loss != "inject":
    raise ValueError("planting trains toward the planted attribute: config.plant.forget_loss must be 'inject'")
  mask = site.mask(model)
  loss_fn = None
  if isinstance(data.retain, train_lib.TextBatch) and retain_top_k:
    data = dataclasses.replace(data, retain=distill_text(model, data.retain, retain_top_k))
  if isinstance(data.retain, DistillText):
    loss_fn = DistillLoss(config)
  return train_lib.edit(
      model, mask, data, config,
      checkpoint_dir=None if checkpoint_dir is None else str(pathlib.Path(checkpoint_dir).resolve()),
      model_spec=model_spec, data_split=dict(record or {}, site=site.spec, retain_loss=(
          f"kl_top{retain_top_k}" if loss_fn is not None else "cross_entropy")), log_fn=log_fn,
      loss_fn=loss_fn, max_checkpoints_to_keep=1,
  )


def load_planted_model(site_dir: str | os.PathLike, base_model: Any) -> tuple[Any, masks_lib.ParamMask, dict[str, Any]]:
  """(planted model, ground-truth mask, checkpoint meta) of a site directory."""
  site_dir = pathlib.Path(site_dir)
  model, meta = train_lib.load_trained_model(site_dir / "planting", base_model)
  mask, _ = masks_lib.load_mask(site_dir / "planted_mask.npz", model)
  return model, mask, meta


def changed_weights(before: Any, after: Any, mask: masks_lib.ParamMask | None = None) -> dict[str, int]:
  """Label -> number of weights that differ; with `mask`, only those outside it.

  Used to check that planting moved nothing outside its site.
  """
  a, b = transformer.parameters_by_label(before), transformer.parameters_by_label(after)
  out = {}
  for label, param in a.items():
    names = tuple(param.value.named_shape)
    x = np.asarray(param.value.unwrap(*names))
    y = np.asarray(b[label].value.unwrap(*names))
    diff = x != y
    if mask is not None:
      m = mask[label]
      diff = diff & ~(np.asarray(m, bool) if isinstance(m, np.ndarray) else np.bool_(m))
    count = int(diff.sum())
    if count:
      out[label] = count
  return out


def phrasing_knowledge(
    model: Any, tokenizer: Any, facts: Sequence[Any], phrasings: Sequence[str], seed: int = 0,
    batch_size: int = 32,
) -> dict[str, dict[str, Any]]:
  """Phrasing -> scores of the true answers (p normalized over candidates, argmax, n)."""
  formats = phrasing_formats(seed)
  out = {}
  for name in phrasings:
    score = formats_eval.evaluate_format(model, tokenizer, formats[name], list(facts), "facts", "correct",
                                         batch_size=batch_size)
    out[name] = score.to_json() if score is not None else None
  return out


# ----------------------------------------------------------------------------------
# Scoring localization against the truth.


mask_overlap = masks_lib.mask_overlap  # precision/recall against the planted mask


def unit_ranks(
    unit_scores: Mapping[masks_lib.Unit, float], targets: Sequence[masks_lib.Unit],
    kinds: Sequence[str] = masks_lib.UNIT_KINDS,
) -> dict[str, Any]:
  """1-based rank of each target unit among the units of `kinds` by |score|.

  Ties break by (layer, kind), as in the mask selection; non-finite scores rank
  last. A target of a kind outside `kinds` (an attention site, for an MLP-only
  method) or without a score gets None.
  """
  candidates = [u for u in unit_scores if u.kind in kinds]

  def key(u):
    s = float(unit_scores[u])
    return (0 if math.isfinite(s) else 1, -abs(s) if math.isfinite(s) else 0.0, u.layer, u.kind)

  order = sorted(candidates, key=key)
  rank = {u: i + 1 for i, u in enumerate(order)}
  ranks = {str(u): rank.get(u) for u in targets}
  found = [r for r in ranks.values() if r is not None]
  return {"ranks": ranks, "out_of": len(order), "best": min(found) if found else None,
          "mean": float(np.mean(found)) if found else None}


def _scores_to_json(scores: Mapping[Any, np.ndarray]) -> list[list[Any]]:
  rows = []
  for key, value in scores.items():
    layer, kind = (key.layer, key.kind) if hasattr(key, "layer") else key
    rows.append([int(layer), str(kind), np.asarray(value, np.float64).reshape(-1).tolist()])
  return rows


def _scores_from_json(rows: Sequence[Sequence[Any]]) -> dict[tuple[int, str], np.ndarray]:
  return {(int(l), str(k)): np.asarray([np.nan if v is None else v for v in vals], np.float64) for l, k, vals in rows}


def method_unit_scores(
    method: str, scores: Mapping[str, Mapping[Any, np.ndarray]], enrichment: Sequence[float | None] | None,
    layout: masks_lib.Layout,
) -> tuple[dict[masks_lib.Unit, float] | None, tuple[str, ...]]:
  """(per-unit scores, unit kinds ranked) of a method; (None, ()) if it has none.

  AP/CT: component scores summed with sign per unit (the reference's unit mode);
  "*_mlps" rank MLP units only. Fact lookup: each MLP's enrichment (None/NaN where no
  extraction layer follows it: ranked last).
  """
  if method == "fact_lookup":
    if enrichment is None:
      return None, ()
    return ({masks_lib.Unit(i, "mlp"): (np.nan if e is None else float(e)) for i, e in enumerate(enrichment)},
            ("mlp",))
  kind = method.split("_")[0]
  if method in select.OUTPUT_TRACING and kind in scores:
    finite = {k: np.nan_to_num(v) for k, v in scores[kind].items()}
    kinds = ("mlp",) if method.endswith("_mlps") else masks_lib.UNIT_KINDS
    return masks_lib.aggregate_unit_scores(finite, layout), kinds
  return None, ()


def mask_at_budget(
    model: Any, method: str, budget: int, *, flu_layers: Sequence[int],
    enrichment: Sequence[float | None] | None, scores: Mapping[str, Mapping[Any, np.ndarray]],
    extraction_layer: int | None, seed: int, config: select.LocalizeConfig,
) -> masks_lib.MaskResult:
  """The mask of `method` at a given parameter budget (e.g. the planted site's).

  The same selection rules as `select.build_mask` with another budget: output
  tracing takes units by |score|; fact lookup takes MLPs by enrichment (the rule's
  layers first); random baselines draw matrices (or as many MLP units as the budget
  holds); late_mlps that many MLPs after the extraction layer; all_mlps and
  nonlocalized have no budget.
  """
  mlp_size = masks_lib.unit_parameter_count(model, masks_lib.Unit(0, "mlp"))
  num_layers = model.config.num_layers
  num_mlps = min(max(1, math.ceil(budget / mlp_size)), num_layers)
  if method == "fact_lookup":
    if enrichment is None:
      ranked = list(flu_layers)
    else:
      e = [(-math.inf if v is None or not math.isfinite(v) else v) for v in enrichment]
      by_score = lambda layers: sorted(layers, key=lambda l: (-e[l], l))
      # The rule's layers first (most enriching first), then the rest by enrichment.
      ranked = by_score(flu_layers) + by_score(l for l in range(num_layers) if l not in flu_layers)
    chosen, total = [], 0
    for l in ranked:
      if total >= budget:
        break
      chosen.append(l)
      total += mlp_size
    return baselines_lib.flu_mlps(model, chosen)
  if method == "random":
    return baselines_lib.random_matrices(model, budget, seed)
  if method == "random_mlps":
    return baselines_lib.random_mlps(model, num_mlps, seed)
  if method == "late_mlps":
    if extraction_layer is None:
      raise ValueError("late_mlps needs the extraction layer")
    return select.late_mlps(model, num_mlps, extraction_layer)
  if method in ("all_mlps", "nonlocalized"):
    return select.build_mask(model, method, flu_layers, seed, config)
  kind = method.split("_")[0]
  if method.endswith("_mlps"):
    return baselines_lib.output_tracing_mlps(method, scores[kind], model, budget)
  return baselines_lib.output_tracing(method, scores[kind], model, budget, mode=config.score_mode)


@dataclasses.dataclass(frozen=True)
class Localizations:
  """Every method's mask at the fact-lookup budget, plus what produced them."""

  masks: dict[str, masks_lib.MaskResult]
  flu_layers: list[int]
  extraction_layers: list[int]
  enrichment: list[float | None] | None
  scores: dict[str, dict[tuple[int, str], np.ndarray]]
  flu_budget: int
  total_effect: list[float | None] | None = None


def localize_methods(
    model: Any, tokenizer: Any, task: tasks_lib.Task, facts: Sequence[Any], methods: Sequence[str],
    config: select.LocalizeConfig, seed: int, out_dir: pathlib.Path | None = None,
    probe_facts: Sequence[Any] | None = None,
) -> Localizations:
  """Every method's mask on `facts` (the first `config.num_prompts`), sharing evidence.

  Fact-lookup evidence, AP and CT scores are computed once (and stored in
  `out_dir`: fact_lookup/, scores.json) and every method's mask is built from them
  with `select.build_mask` at the fact-lookup budget. The fact-lookup probes train on
  `probe_facts` (the first `config.probe_facts`) when there are more of them than
  localization prompts, as in `experiment.stages.localization_stage`.
  """
  facts = list(facts)[: config.num_prompts]
  fmt = task.localize_format()
  batch = task.fact_batch(tokenizer, fmt, facts)
  labels, names = task.attribute_labels(facts)
  probe_batch = probe_labels = None
  probe_facts = list(probe_facts or [])[: config.probe_facts]
  if len(probe_facts) > len(facts) and not config.layers:
    probe_labels, probe_names = task.attribute_labels(probe_facts)
    if tuple(probe_names) != tuple(names):
      raise ValueError(f"probe facts have classes {probe_names}, the localization facts {names}")
    probe_batch = task.fact_batch(tokenizer, fmt, probe_facts)
  corrupt = select.corrupt_batch(model, tokenizer, batch, seed)
  layers, evidence = select.fact_lookup_layers(
      model, batch, corrupt, labels, len(names), config, seed, out_dir, {"task": task.name},
      probe_batch=probe_batch, probe_labels=probe_labels,
  )
  enrichment = total_effect = None
  flu_json = None if out_dir is None else out_dir / "fact_lookup" / "fact_lookup.json"
  if flu_json is not None and flu_json.is_file():
    record = io.read_json(flu_json, "fact-lookup evidence")
    enrichment = record["enrichment"]
    total_effect = (record.get("total_effect") or {}).get("effect")
  extraction = evidence.get("extraction_layers") or []
  needed = sorted({m.split("_")[0] for m in methods if m in select.OUTPUT_TRACING})
  scores_path = None if out_dir is None else out_dir / "scores.json"
  stored = io.read_json(scores_path, "component scores") if scores_path is not None and scores_path.is_file() else {}
  scores = {k: _scores_from_json(v) for k, v in stored.items()}
  missing = [k for k in needed if k not in scores]
  for kind in missing:
    with progress.stage(f"scores {kind}"):
      scores[kind] = _scores_from_json(_scores_to_json(
          select.output_tracing_scores(model, batch, corrupt, kind, config, seed)
      ))
  if missing and scores_path is not None:
    io.write_json(scores_path, {k: _scores_to_json(v) for k, v in scores.items()})
  built = {}
  for method in methods:
    kind = method.split("_")[0]
    built[method] = select.build_mask(
        model, method, layers, seed, config, scores.get(kind), min(extraction) if extraction else None
    )
  return Localizations(
      masks=built, flu_layers=list(layers), extraction_layers=list(extraction), enrichment=enrichment,
      scores=scores, flu_budget=baselines_lib.flu_mlps(model, layers).trained_parameters,
      total_effect=total_effect,
  )


TOTAL_EFFECT_ROW = "total_effect"


def localization_table(
    model: Any, loc: Localizations, site: PlantSite, config: select.LocalizeConfig, seed: int,
) -> list[dict[str, Any]]:
  """One row per method: precision / recall at both budgets, ranks of the planted units."""
  truth = site.mask(model)
  planted_budget = masks_lib.trained_parameter_count(truth, model)
  rows = []
  for method, flu_mask in loc.masks.items():
    at_planted = mask_at_budget(
        model, method, planted_budget, flu_layers=loc.flu_layers, enrichment=loc.enrichment,
        scores=loc.scores, extraction_layer=min(loc.extraction_layers) if loc.extraction_layers else None,
        seed=seed, config=config,
    )
    unit_scores, kinds = method_unit_scores(method, loc.scores, loc.enrichment, model)
    rows.append({
        "method": method,
        "flu_budget": dict(mask_overlap(flu_mask.mask, truth, model), units=flu_mask.details.get("units"),
                           labels=len(flu_mask.details.get("labels", []))),
        "planted_budget": dict(mask_overlap(at_planted.mask, truth, model), units=at_planted.details.get("units"),
                               labels=len(at_planted.details.get("labels", []))),
        "rank": unit_ranks(unit_scores, site.units(), kinds) if unit_scores is not None else None,
    })
  if loc.total_effect is not None:
    # Not a method: the fact-lookup evidence's independent check (each MLP's output
    # mean-ablated at the subject tokens), ranked and cut at both budgets like FLU.
    effect = {masks_lib.Unit(i, "mlp"): (np.nan if e is None else float(e)) for i, e in enumerate(loc.total_effect)}
    mlp_size = masks_lib.unit_parameter_count(model, masks_lib.Unit(0, "mlp"))
    ranked = sorted(effect, key=lambda u: (-np.nan_to_num(effect[u], nan=-np.inf), u.layer))
    row = {"method": TOTAL_EFFECT_ROW, "rank": unit_ranks(effect, site.units(), ("mlp",))}
    for key, count in (("flu_budget", max(1, len(loc.flu_layers))),
                       ("planted_budget", min(len(ranked), max(1, math.ceil(planted_budget / mlp_size))))):
      chosen = baselines_lib.flu_mlps(model, [u.layer for u in ranked[:count]])
      row[key] = dict(mask_overlap(chosen.mask, truth, model), units=chosen.details.get("units"),
                      labels=len(chosen.details.get("labels", [])))
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------
# The job.


def _fmt(x: Any, spec: str = ".2f") -> str:
  return "-" if x is None else format(x, spec)


def localization_markdown(site: PlantSite, rows: Sequence[Mapping[str, Any]], flu_layers: Sequence[int],
                          planted_budget: int, flu_budget: int) -> str:
  """The table of one planting site."""
  lines = [
      f"#### Site `{site.spec}` (planted budget {planted_budget:,} weights; fact-lookup budget"
      f" {flu_budget:,}, FLU layers {list(flu_layers)})",
      "",
      "| method | units @ FLU budget | precision | recall | units @ planted budget | precision | recall |"
      " rank of planted units (of n) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    a, b = r["flu_budget"], r["planted_budget"]
    units = lambda d: ", ".join(d["units"] or []) or f"{d['labels']} matrices"
    rank = r["rank"]
    rank_text = "-" if rank is None else (
        ", ".join(f"{u}: {_fmt(v, 'd')}" for u, v in rank["ranks"].items()) + f" (of {rank['out_of']})")
    lines.append(
        f"| {r['method']} | {units(a)} | {_fmt(a['precision'])} | {_fmt(a['recall'])} | {units(b)} |"
        f" {_fmt(b['precision'])} | {_fmt(b['recall'])} | {rank_text} |"
    )
  return "\n".join(lines) + "\n"


def _cell(cells: Sequence[Mapping[str, Any]], fmt: str, facts: str, answer: str, key: str = "prob_normalized"):
  for c in cells:
    if c["format"] == fmt and c["facts"] == facts and c["answer"] == answer:
      return c[key]
  return None


def _staged_json(path: pathlib.Path, fn: Callable[[], Any], what: str) -> Any:
  if path.is_file():
    return io.read_json(path, what)
  out = fn()
  io.write_json(path, out)
  return io.read_json(path, what)


@contextlib.contextmanager
def _lock(workdir: pathlib.Path):
  from mech_unlearn_jax.experiment import run as run_lib  # pylint: disable=g-import-not-at-top

  with run_lib.workdir_lock(workdir):
    yield


def _check_config(config: PlantConfig, workdir: pathlib.Path) -> None:
  path = workdir / "config.json"
  current = json.loads(io.dumps(config.to_json()))
  if path.is_file():
    previous = io.read_json(path, "run config")
    if previous != current:
      changed = schema.diff(previous, current)
      raise ValueError(
          f"{path}: the workdir holds a planting run with a different config ({'; '.join(changed[:8])});"
          " use a new --workdir to start another"
      )
  else:
    io.write_json(path, current)


def run_plant(config: PlantConfig, workdir: str | os.PathLike) -> dict[str, Any]:
  """Plants, localizes, edits and evaluates (see the module docstring); resumable.

  Every stage writes its output atomically and reads it back on a rerun; planting and
  edits resume from their orbax checkpoints. Returns the results dict (also written
  to results.json / results.md).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with _lock(workdir):
    _check_config(config, workdir)
    return _run(config, workdir)


def _run(config: PlantConfig, workdir: pathlib.Path) -> dict[str, Any]:
  from mech_unlearn_jax.experiment import stages  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax.models import loaders  # pylint: disable=g-import-not-at-top

  sites = config.parsed_sites
  with progress.stage("load model") as info:
    base, tokenizer = loaders.load_model_and_tokenizer(config.model, config.seed)
    info["detail"] = f"{config.model}: {base.config.num_layers} layers"
  for site in sites:
    site.check(base)
  sports = tasks_lib.get_task("sports")
  real_data = tasks_lib.DataConfig(task="sports", sports_source=config.real_source,
                                   known_threshold=config.known_threshold, max_facts=config.max_real_facts)

  with progress.stage("real knowledge") as info:
    real = stages.knowledge_stage(base, tokenizer, sports, real_data, config.eval.batch_size,
                                  workdir / "real_knowledge.json")
    info["detail"] = f"{len(real.pool)} of {len(real.facts)} real athletes known"
  if len(real.pool) < 4:
    raise ValueError(f"the model knows only {len(real.pool)} real athletes; planting needs some to maintain")

  with progress.stage("invent names") as info:
    names_path = workdir / "names.json"
    if names_path.is_file():
      names = io.read_json(names_path, "invented names")["names"]
    else:
      names, record = find_unknown_names(base, tokenizer, config.num_facts, config.seed, config.names,
                                         exclude=[f.athlete for f in real.facts])
      io.write_json(names_path, record)
    facts_path = workdir / "facts.csv"
    if not facts_path.is_file():
      write_planted_facts(facts_path, make_planted_facts(names, config.seed))
    planted = read_planted_facts(facts_path)
    info["detail"] = f"{len(planted)} invented athletes, e.g. {', '.join(names[:3])}"

  # The planted model's knowledge scan reads only the real athletes the base model
  # knows: the others could never join the maintain set.
  real_known_path = workdir / "real_known.csv"
  if not real_known_path.is_file():
    write_planted_facts(real_known_path, real.pool)
  task = PlantedTask(str(real_known_path))
  retain = stages.retain_stage(base, tokenizer, config.retain, config.model, config.seed)
  maintain_real = real.pool[: config.max_maintain]
  # Real athletes the planting never trained on show what it did to the rest.
  heldout_real = real.pool[config.max_maintain:] or real.pool[-max(1, len(real.pool) // 5):]
  heldout_real = heldout_real[: config.max_maintain_eval or None]
  all_phrasings = tuple(config.train_phrasings) + tuple(config.heldout_formats)

  with progress.stage("base knowledge") as info:
    base_planted = _staged_json(
        workdir / "base_phrasings.json",
        lambda: {"planted": phrasing_knowledge(base, tokenizer, planted, all_phrasings, config.seed),
                 "real_heldout": phrasing_knowledge(base, tokenizer, heldout_real, all_phrasings, config.seed)},
        "base-model phrasing scores",
    )

  real_loc = None
  if config.localize_real:
    with progress.stage("localize real facts") as info:
      def real_localization():
        loc = localize_methods(base, tokenizer, sports, real.pool, config.methods, config.localize, config.seed,
                               workdir / "real", probe_facts=real.pool)
        return {"flu_layers": loc.flu_layers, "extraction_layers": loc.extraction_layers,
                "flu_budget": loc.flu_budget,
                "methods": {m: {"units": r.details.get("units"), "trained_parameters": r.trained_parameters}
                            for m, r in loc.masks.items()}}
      real_loc = _staged_json(workdir / "real" / "summary.json", real_localization, "real-fact localization")
      info["detail"] = f"FLU layers {real_loc['flu_layers']}"

  site_results = {}
  for site in sites:
    site_results[site.spec] = _run_site(
        config, site, workdir / "sites" / site.slug, base, tokenizer, task, planted, maintain_real,
        heldout_real, retain, facts_path,
    )
  results = {
      "config": config.to_json(),
      "names": {"num": len(names), "examples": names[:8]},
      "real_known": len(real.pool),
      "base_phrasings": base_planted,
      "real_localization": real_loc,
      "sites": site_results,
  }
  # Rewritten only when changed, so a rerun of a finished job touches nothing.
  for name, text in (("results.json", io.dumps(results)), ("results.md", results_markdown(results))):
    path = workdir / name
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
      io.write_text(path, text)
  return json.loads(io.dumps(results))


def _run_site(
    config: PlantConfig, site: PlantSite, site_dir: pathlib.Path, base: Any, tokenizer: Any,
    task: PlantedTask, planted: Sequence[PlantedFact], maintain_real: Sequence[Any],
    heldout_real: Sequence[Any], retain: Any, facts_path: pathlib.Path,
) -> dict[str, Any]:
  from mech_unlearn_jax.experiment import stages  # pylint: disable=g-import-not-at-top

  site_dir.mkdir(parents=True, exist_ok=True)
  truth = site.mask(base)
  planted_budget = masks_lib.trained_parameter_count(truth, base)
  _staged_json(site_dir / "site.json", lambda: {"site": site.spec, "units": [str(u) for u in site.units()],
                                                "trained_parameters": planted_budget}, "site")
  if not (site_dir / "planted_mask.npz").is_file():
    masks_lib.save_mask(site_dir / "planted_mask.npz", truth, base, {"site": site.spec})

  with progress.stage(f"plant {site.spec}") as info:
    data = planting_data(tokenizer, planted, maintain_real, config.train_phrasings, retain.train, config.seed)
    bar = progress.bar(total=config.plant.steps, desc=f"plant {site.spec}", unit="step")

    def log(step, metrics):
      bar.update(step - bar.n)
      bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3g}")

    try:
      result = plant(base, site, data, config.plant, checkpoint_dir=site_dir / "planting", model_spec=config.model,
                     record={"facts": str(facts_path.name), "phrasings": list(config.train_phrasings)}, log_fn=log,
                     retain_top_k=config.plant_retain_top_k)
    finally:
      bar.close()
    planted_model = result.model
    last = result.history[-1] if result.history else {}
    info["detail"] = f"{len(result.history)} steps, final loss {last.get('loss', float('nan')):.3g}"

  all_phrasings = tuple(config.train_phrasings) + tuple(config.heldout_formats)

  def planting_record():
    outside = changed_weights(base, planted_model, truth)
    return {
        "site": site.spec,
        "trained_parameters": planted_budget,
        "changed_outside_site": sum(outside.values()),
        "history": result.history,
        "planted": phrasing_knowledge(planted_model, tokenizer, planted, all_phrasings, config.seed),
        "real_heldout": phrasing_knowledge(planted_model, tokenizer, heldout_real, all_phrasings, config.seed),
        "retain_text": scoring.text_metrics(planted_model, retain.heldout.tokens_BxL, retain.heldout.positions_BxL),
        "kl_base_planted": scoring.kl_divergence(base, planted_model, retain.heldout.tokens_BxL,
                                                 retain.heldout.positions_BxL),
    }

  with progress.stage(f"planting eval {site.spec}"):
    planting = _staged_json(site_dir / "planting.json", planting_record, "planting record")

  data_config = tasks_lib.DataConfig(task="planted", sports_source=str(facts_path), split=PLANTED_SPLIT,
                                     known_threshold=config.known_threshold, max_maintain_eval=config.max_maintain_eval)
  with progress.stage(f"knowledge {site.spec}") as info:
    knowledge = stages.knowledge_stage(planted_model, tokenizer, task, data_config, config.eval.batch_size,
                                       site_dir / "knowledge.json")
    num_planted = sum(isinstance(f, PlantedFact) for f in knowledge.pool)
    info["detail"] = f"{num_planted} of {len(planted)} planted facts known"
  if num_planted < 2:
    raise ValueError(
        f"site {site.spec}: only {num_planted} planted facts are known after planting; raise config.plant.steps"
        " or config.plant.lr"
    )
  split = stages.split_stage(task, knowledge.pool, PLANTED_SPLIT, config.seed, {"site": site.spec},
                             site_dir / "split.json")
  forget = split.select(knowledge.facts, "forget_train")

  with progress.stage(f"localize {site.spec}") as info:
    # Only planted facts: the question is where *they* live.
    loc = localize_methods(planted_model, tokenizer, task, forget, config.methods, config.localize, config.seed,
                           site_dir / "localization", probe_facts=forget)
    rows = _staged_json(site_dir / "localization" / "table.json",
                        lambda: localization_table(planted_model, loc, site, config.localize, config.seed),
                        "localization table")
    info["detail"] = f"FLU layers {loc.flu_layers}"

  edits = _edit_site(config, site, site_dir, planted_model, tokenizer, task, knowledge.facts, split, loc, truth,
                     retain, data_config)
  return {
      "site": site.spec,
      "planted_budget": planted_budget,
      "planting": {k: v for k, v in planting.items() if k != "history"},
      "planting_final_loss": planting["history"][-1] if planting["history"] else None,
      "known_planted": num_planted,
      "flu_layers": loc.flu_layers,
      "extraction_layers": loc.extraction_layers,
      "flu_budget": loc.flu_budget,
      "localization": rows,
      "edits": edits,
  }


def _edit_site(
    config: PlantConfig, site: PlantSite, site_dir: pathlib.Path, planted_model: Any, tokenizer: Any,
    task: PlantedTask, facts: Sequence[Any], split: splits_lib.Split, loc: Localizations,
    truth: masks_lib.ParamMask, retain: Any, data_config: tasks_lib.DataConfig,
) -> dict[str, Any]:
  """The control and every edit method: formats, then the robustness suite."""
  from mech_unlearn_jax.experiment import stages  # pylint: disable=g-import-not-at-top

  unlearn = config.edit.forget_loss == "unlearn"
  eval_config = config.eval
  out: dict[str, Any] = {}
  targets = [("unedited", None)] + [(m, truth if m == PLANTED_METHOD else loc.masks[m].mask)
                                     for m in config.edit_methods]
  data = stages.edit_data(tokenizer, task, facts, split, unlearn, retain.train) if config.edit_methods else None
  for name, mask in targets:
    edit_dir = site_dir / "edits" / name
    with progress.stage(f"{'edit ' if mask is not None else ''}{name} {site.spec}") as info:
      if mask is None:
        model = planted_model
      else:
        result = stages.edit_stage(planted_model, mask, data, config.edit, edit_dir / "checkpoints",
                                   f"planted:{site.spec}", split)
        model = result.model
      formats = stages.evaluation_stage(
          model, tokenizer, task, facts, split, eval_config, data_config, unlearn, retain.heldout, config.seed,
          original=planted_model, path=edit_dir / "formats.json",
      )
      robust = run_robustness_suite(model, tokenizer, task, facts, split, config, unlearn=unlearn,
                                    retain_train=retain.train, base_model=planted_model, out_dir=edit_dir)
      info["detail"] = f"standard forget p(true) {_fmt(_cell(formats['cells'], 'standard', 'forget', 'correct'))}"
    out[name] = {
        "trained_parameters": 0 if mask is None else masks_lib.trained_parameter_count(mask, planted_model),
        "vs_planted": None if mask is None else mask_overlap(mask, truth, planted_model),
        "cells": formats["cells"],
        "kl_planted_edited": formats.get("kl_original_edited"),
        "retain_text": formats.get("retain_text"),
        "robustness": _robustness_summary(robust),
    }
  return out


def run_robustness_suite(
    model: Any, tokenizer: Any, task: tasks_lib.Task, facts: Sequence[Any], split: splits_lib.Split,
    config: PlantConfig, *, unlearn: bool, retain_train: Any, base_model: Any, out_dir: pathlib.Path,
) -> dict[str, Any]:
  """The library's robustness suite (`experiment.robustness.run_robustness`) on one model."""
  from mech_unlearn_jax.experiment import robustness  # pylint: disable=g-import-not-at-top

  return robustness.run_robustness(
      model, tokenizer, task, facts, split, config.robustness, formats=config.eval.formats, unlearn=unlearn,
      retain_train=retain_train, seed=config.seed, batch_size=config.eval.batch_size, base_model=base_model,
      out_dir=out_dir,
  )


def _robustness_summary(robust: Mapping[str, Any]) -> dict[str, Any]:
  """A few numbers per robustness stage (the full records stay in their JSON files)."""
  out: dict[str, Any] = {}
  for name, rec in robust.items():
    if name.startswith("relearn"):
      curve = rec.get("curve", {})
      out[name] = {step: _cell(v.get("cells", []), "standard", "forget_heldout", "correct")
                   for step, v in curve.items()}
    elif name == "probes":
      part = rec.get("transfer") or rec.get("retrained") or {}
      out[name] = {"forget_true_max": part.get("summary", {}).get("forget_true_max"),
                   "heldout_max": part.get("summary", {}).get("heldout_max")}
    elif name.startswith("softprompt"):
      out[name] = {"before": rec.get("before_eval", {}).get("prob_normalized"),
                   "after": rec.get("summary", {}).get("prob_normalized_mean")}
    else:
      out[name] = {k: v for k, v in rec.items() if isinstance(v, (int, float))}
  return out


def results_markdown(results: Mapping[str, Any]) -> str:
  """results.md: planting, one localization table per site, the robustness table."""
  cfg = results["config"]
  lines = [f"# Planted facts: {cfg['model']}, {results['names']['num']} invented athletes", ""]
  lines.append(f"Examples: {', '.join(results['names']['examples'])}. Real athletes known: {results['real_known']}.")
  lines.append("")
  base = results["base_phrasings"]["planted"]
  real_loc = results.get("real_localization")
  if real_loc:
    lines.append(f"Real sports facts (base model): FLU layers {real_loc['flu_layers']}, extraction layers"
                 f" {real_loc['extraction_layers']}; picks: "
                 + "; ".join(f"{m}: {', '.join(v['units'] or []) or '-'}" for m, v in real_loc["methods"].items()))
    lines.append("")
  for spec, site in results["sites"].items():
    p = site["planting"]
    lines.append(f"## Site `{spec}`")
    lines.append("")
    lines.append(f"Planted {site['known_planted']} of {results['names']['num']} facts known (standard format);"
                 f" weights changed outside the site: {p['changed_outside_site']};"
                 f" KL(base || planted) on held-out text {p['kl_base_planted']:.4f} nats/token.")
    lines.append("")
    lines.append("| phrasing | trained on | planted p(true) base -> planted | argmax | real athletes (held out)"
                 " p(true) base -> planted |")
    lines.append("|---|---|---|---|---|")
    real_base = results["base_phrasings"]["real_heldout"]
    for name, cell in p["planted"].items():
      trained = "yes" if name in cfg["train_phrasings"] else "no"
      lines.append(
          f"| {name} | {trained} | {_fmt(base[name]['prob_normalized'])} -> {_fmt(cell['prob_normalized'])} |"
          f" {_fmt(cell['argmax_candidates'])} | {_fmt(real_base[name]['prob_normalized'])} ->"
          f" {_fmt(p['real_heldout'][name]['prob_normalized'])} |"
      )
    lines.append("")
    lines.append(localization_markdown(PlantSite.parse(spec), site["localization"], site["flu_layers"],
                                       site["planted_budget"], site["flu_budget"]))
    if site["edits"]:
      formats = list(cfg["eval"]["formats"])
      head = " | ".join(f"{f} forget" for f in formats)
      lines.append(f"| model | weights | precision vs planted | {head} | edit target (standard) | maintain (standard) |"
                   " probe forget-true (max) | relearned forget | KL vs planted |")
      lines.append("|---|---|---|" + "---|" * len(formats) + "---|---|---|---|---|")
      for name, e in site["edits"].items():
        vals = " | ".join(_fmt(_cell(e["cells"], f, "forget", "correct")) for f in formats)
        edit_p = _fmt(_cell(e["cells"], "standard", "forget", "edit"))
        maint = _fmt(_cell(e["cells"], "standard", "maintain", "correct"))
        rob = e["robustness"]
        probe = _fmt((rob.get("probes") or {}).get("forget_true_max"))
        relearn = rob.get("relearn_lora") or rob.get("relearn_full") or {}
        relearned = _fmt(relearn[max(relearn, key=int)]) if relearn else "-"
        prec = _fmt((e["vs_planted"] or {}).get("precision"))
        lines.append(f"| {name} | {e['trained_parameters']:,} | {prec} | {vals} | {edit_p} | {maint} | {probe} |"
                     f" {relearned} | {_fmt(e['kl_planted_edited'], '.4f')} |")
      lines.append("")
  return "\n".join(lines) + "\n"
