"""Shared defaults for every experiment config (ml_collections).

Each experiment file calls `base_config(...)` and changes what differs. Every value
can be overridden from the command line, e.g.
  python -m launch.run --config=configs/sports_first16.py --config.edit.lr=2e-5

Hyperparameters follow METHOD §3 (AdamW, weight decay 0, cosine decay to 0, clip 1.0,
50 steps, c_m = c_r = 1); learning rates are re-tuned for fp32 master weights.
"""

import ml_collections

LOCALIZATION_METHODS = (
    "fact_lookup", "ap", "ct", "ap_mlps", "ct_mlps",
    "random", "random_mlps", "all_mlps", "nonlocalized",
)


def base_config(task: str = "sports", split: str = "first_16", method: str = "fact_lookup") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = "default"  # "default" (Gemma 3 270M GGUF), a .gguf path or a HF checkpoint dir

  c.data = ml_collections.ConfigDict()
  c.data.task = task  # "sports" or "counterfact"
  c.data.sports_source = "embedded"  # "embedded" or a CSV/parquet path
  c.data.counterfact_path = "../shared/data/reference/counterfact_with_prompts.csv"
  c.data.counterfact_mc_path = "../shared/data/reference/counterfact_mc_questions.parquet"
  c.data.split = split  # first_16 / first_64 / basketball / baseball / football
  c.data.known_threshold = 0.5
  c.data.known_normalization = "candidates"  # or "full_vocab"
  c.data.max_facts = 0  # 0: every fact of the table; >0 reads only the first ones
  c.data.max_pool = 0  # 0: all known facts; >0 caps the pool (tiny runs)
  c.data.max_maintain_eval = 64  # maintain facts evaluated per format

  c.localize = ml_collections.ConfigDict()
  c.localize.method = method
  c.localize.layers = ""  # explicit FLU MLP layers, e.g. "2,3,4,5"; empty = automatic rule
  # The fact-lookup rule (see mech_unlearn_jax/localize/fact_lookup.py): MLP layers
  # before the extraction layers whose enrichment score exceeds the threshold. The
  # paper's CounterFact rule is baseline="last", absolute=True, threshold=0.02.
  c.localize.flu_threshold = 0.05
  c.localize.flu_baseline = "zero"
  c.localize.flu_absolute = False
  c.localize.flu_contiguous = False
  c.localize.score_mode = "reference"  # or "per_matrix"
  c.localize.num_prompts = 32
  c.localize.seed = 0

  c.edit = ml_collections.ConfigDict()
  c.edit.loss = "inject"  # "inject" (edit toward the target) or "unlearn" (-log(1-p))
  c.edit.lr = 1e-4
  c.edit.steps = 30
  c.edit.forget_coef = 1.0
  c.edit.maintain_coef = 1.0
  c.edit.retain_coef = 1.0
  c.edit.batch_size = 16  # examples per term per step
  c.edit.weight_decay = 0.0
  c.edit.clip_norm = 1.0
  c.edit.warmup_steps = 0
  c.edit.checkpoint_every = 10

  c.retain = ml_collections.ConfigDict()
  c.retain.source = "sampled"  # "sampled" (from the unedited model, cached) or a datasets source
  # Sampling without a KV cache costs ~num_windows * window^2: keep the offline default
  # small (it is cached after the first run); use a datasets source for more text.
  c.retain.num_windows = 32
  c.retain.window = 32
  c.retain.heldout_windows = 8

  c.eval = ml_collections.ConfigDict()
  c.eval.formats = "standard,qa,mc,declarative,cloze"
  c.eval.batch_size = 32
  return c


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config for tests: tiny random model, few facts, few steps."""
  c.model = "tiny-gemma3"
  # CounterFact holds out 64 few-shot facts, so its tiny pool must be larger.
  c.data.max_facts = 96 if c.data.task == "counterfact" else 48
  c.data.max_pool = 80 if c.data.task == "counterfact" else 40
  c.data.split = "first_4" if c.data.split.startswith("first_") else c.data.split
  c.data.known_threshold = 0.0  # a random model knows nothing; keep every fact
  c.data.max_maintain_eval = 8
  c.localize.num_prompts = 4
  if c.localize.method == "fact_lookup":
    c.localize.layers = "1"
  c.edit.steps = 3
  c.edit.batch_size = 4
  c.edit.checkpoint_every = 2
  c.retain.num_windows = 6
  c.retain.window = 8
  c.retain.heldout_windows = 2
  c.eval.batch_size = 8
  return c


def from_arg(arg: str | None, task: str, split: str) -> ml_collections.ConfigDict:
  """Builds a config from a `--config=file.py:ARG` argument.

  ARG is a comma-separated list: an optional localization method (default
  fact_lookup) and optionally "tiny", e.g. "ap", "tiny", "random_mlps,tiny".
  """
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  tiny = "tiny" in parts
  methods = [p for p in parts if p != "tiny"]
  unknown = [m for m in methods if m not in LOCALIZATION_METHODS]
  if unknown or len(methods) > 1:
    raise ValueError(
        f"config argument {arg!r}: expected at most one of {LOCALIZATION_METHODS} and/or 'tiny'"
    )
  c = base_config(task=task, split=split, method=methods[0] if methods else "fact_lookup")
  return make_tiny(c) if tiny else c


def use_counterfact_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CounterFact formats and the paper's CounterFact FLU rule (|score - last| > 0.02)."""
  c.eval.formats = "standard,paraphrase,neighborhood,mc"
  c.localize.flu_threshold = 0.02
  c.localize.flu_baseline = "last"
  c.localize.flu_absolute = True
  c.localize.flu_contiguous = True
  return c
