"""Soft-prompt attack: can a small learned input bring an edited fact back? (METHOD §4)

The forget set is split in halves by the caller: a soft prompt (k norm-bounded prefix
vectors, or the embedding-level adapter of the reference) is trained on the first half
toward the TRUE answers (cross-entropy on the last prompt token, no maintain or retain
terms: the attacker only wants the facts back), with every model weight frozen, and
evaluated on the held-out second half. Several independently seeded attacks are run
(reference: 4); the report gives, before and after, p(true) normalized over the
candidate answers and argmax accuracy over the candidates, per attack and as mean and
spread.

Training is the train package's `train(...)` with `EditLoss` on a soft-prompt
trainable (`train/soft_prompt.py`); the bound model takes the standard left-padded
batches, so the same `FactBatch`es as everywhere else are used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.evals import scoring
from mech_unlearn_jax.models.transformer import CausalLM
from mech_unlearn_jax.train import EditConfig, EditData, EditLoss, count_parameters, make_batch_fn, train
from mech_unlearn_jax.train.loop import can_share_prefix
from mech_unlearn_jax.train import soft_prompt as sp

AttackKind = Literal["prefix", "adapter"]

# An attack trains a handful of vectors, so a far larger step than weight edits use.
DEFAULT_ATTACK_TRAINING = EditConfig(
    steps=100, lr=1e-2, forget_loss="inject", maintain_coef=0.0,
    retain_coef=0.0, forget_batch_size=64,
)


@dataclasses.dataclass(frozen=True)
class SoftPromptAttackConfig:
  """Settings of `soft_prompt_attack`.

  Attributes:
    kind: "prefix" (k learned vectors after BOS) or "adapter" (the embedding-level
      attention adapter with k keys).
    num_vectors: k, prefix vectors or adapter keys.
    max_norm: L2 bound of each vector (and each adapter key/value); None: `norm_scale`
      times the median norm of the model's token embeddings (as block 0 sees them).
    norm_scale: see `max_norm`.
    num_attacks: independently seeded attacks (seeds `seed`, `seed + 1`, ...: the
      initialization and the data order).
    seed: first seed.
    training: optimizer settings; `forget_loss` must be "inject" (CE toward the batch's
      answers, which are the true answers here). Its `seed` is unused: each attack's
      seed sets its initialization and data order.
    eval_steps: also evaluate the held-out half after these step counts (e.g. (10,)).
    chunk_size: prompts per scoring batch.
  """

  kind: AttackKind = "prefix"
  num_vectors: int = 8
  max_norm: float | None = None
  norm_scale: float = 1.0
  num_attacks: int = 4
  seed: int = 0
  training: EditConfig = DEFAULT_ATTACK_TRAINING
  eval_steps: tuple[int, ...] = ()
  chunk_size: int = 64

  def __post_init__(self):
    if self.kind not in ("prefix", "adapter"):
      raise ValueError(f"SoftPromptAttackConfig.kind must be 'prefix' or 'adapter', got {self.kind!r}")
    if self.num_attacks < 1:
      raise ValueError(f"SoftPromptAttackConfig.num_attacks must be >= 1, got {self.num_attacks}")
    if self.training.forget_loss != "inject":
      raise ValueError(
          "SoftPromptAttackConfig.training.forget_loss must be 'inject' (cross-entropy toward"
          f" the true answers), got {self.training.forget_loss!r}"
      )
    if self.max_norm is None and not self.norm_scale > 0:
      raise ValueError(f"SoftPromptAttackConfig.norm_scale must be > 0, got {self.norm_scale}")
    bad = [s for s in self.eval_steps if not 0 < s <= self.training.steps]
    if bad:
      raise ValueError(f"SoftPromptAttackConfig.eval_steps {bad} outside 1..{self.training.steps}")

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["training"] = self.training.to_json()
    out["eval_steps"] = list(self.eval_steps)
    return out


def _summary(model: Any, batch: FactBatch, chunk_size: int) -> dict[str, float]:
  s = scoring.score_facts(model, batch, chunk_size=chunk_size).summary()
  return {k: s[k] for k in ("prob_normalized", "argmax_candidates", "prob_full", "n")}


def _spread(runs: list[dict[str, Any]], part: str) -> dict[str, float]:
  out = {}
  for metric in ("prob_normalized", "argmax_candidates"):
    values = np.array([r[part][metric] for r in runs], np.float64)
    out[f"{metric}_mean"] = float(values.mean())
    out[f"{metric}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    out[f"{metric}_min"] = float(values.min())
    out[f"{metric}_max"] = float(values.max())
  return out


@dataclasses.dataclass(frozen=True)
class SoftPromptAttackResult:
  """What `soft_prompt_attack` measured (all JSON-able).

  Attributes:
    config: the attack settings.
    max_norm: the norm bound actually used.
    num_trained_parameters: trained scalars per attack.
    before_eval, before_train: scores of the attacked model without a soft prompt on
      the held-out and the training half.
    runs: per attack: seed, "eval" and "train" scores after training, the final loss,
      and "eval_at_step" (step -> held-out scores) for `config.eval_steps`.
    summary: mean, std (over attacks), min and max of the held-out scores after.
  """

  config: SoftPromptAttackConfig
  max_norm: float
  num_trained_parameters: int
  before_eval: dict[str, float]
  before_train: dict[str, float]
  runs: list[dict[str, Any]]
  summary: dict[str, float]

  def to_json(self) -> dict[str, Any]:
    return {
        "config": self.config.to_json(),
        "max_norm": self.max_norm,
        "num_trained_parameters": self.num_trained_parameters,
        "before_eval": self.before_eval,
        "before_train": self.before_train,
        "runs": self.runs,
        "summary": self.summary,
    }


def make_attack_trainable(
    model: CausalLM, config: SoftPromptAttackConfig, max_norm: float, seed: int
) -> tuple[dict[str, Any], sp.SoftPromptTrainable | sp.EmbeddingAdapterTrainable, None]:
  """(params, trainable, update_mask) of one attack of `config.kind`."""
  if config.kind == "prefix":
    return sp.soft_prompt_trainable(model, num_vectors=config.num_vectors, max_norm=max_norm, seed=seed)
  return sp.embedding_adapter_trainable(model, num_keys=config.num_vectors, max_norm=max_norm, seed=seed)


def soft_prompt_attack(
    model: CausalLM,
    train_batch: FactBatch,
    eval_batch: FactBatch,
    config: SoftPromptAttackConfig = SoftPromptAttackConfig(),
    *,
    log_fn=None,
) -> SoftPromptAttackResult:
  """Trains `config.num_attacks` soft prompts on `train_batch`, scores `eval_batch`.

  Args:
    model: the (edited) model under attack; never modified.
    train_batch: the attacker's facts, `answer_ids_B` = their TRUE answers and
      `wrong_ids_BxK` the other candidates.
    eval_batch: held-out facts of the same kind (true answers), scored before and
      after.
    config: attack settings.
    log_fn: passed to `train` (log_fn(step, metrics)); None: silent.

  Returns:
    SoftPromptAttackResult (scores are p(true) normalized over the candidates and
    argmax accuracy over the candidates, plus full-vocabulary p(true)).
  """
  if train_batch.size == 0 or eval_batch.size == 0:
    raise ValueError("soft_prompt_attack needs a non-empty train_batch and eval_batch")
  if config.max_norm is not None:
    max_norm = float(config.max_norm)
  else:
    max_norm = config.norm_scale * sp.median_embedding_norm(model, seed=config.seed)
  chunk = config.chunk_size
  before_eval = _summary(model, eval_batch, chunk)
  before_train = _summary(model, train_batch, chunk)
  data = EditData(forget=train_batch)
  runs = []
  num_params = 0
  for attack in range(config.num_attacks):
    seed = config.seed + attack
    params, trainable, update_mask = make_attack_trainable(model, config, max_norm, seed)
    num_params = count_parameters(params)
    # The seed reaches the data order through the batch function only: the step's
    # static config stays the same, so all attacks share one compiled step.
    loss_fn = EditLoss(config.training)
    batch_fn = make_batch_fn(
        data, dataclasses.replace(config.training, seed=seed),
        share_prefix=can_share_prefix(loss_fn, trainable, params),
    )
    at_step = {}

    def callback(step, live_params, trainable=trainable, at_step=at_step):
      if step in config.eval_steps:
        at_step[step] = _summary(trainable.merge(live_params), eval_batch, chunk)

    result = train(
        params, trainable, batch_fn, config.training, update_mask=update_mask, loss_fn=loss_fn,
        log_fn=log_fn, callback=callback if config.eval_steps else None,
    )
    attacked = trainable.merge(result.params)
    runs.append({
        "seed": seed,
        "eval": _summary(attacked, eval_batch, chunk),
        "train": _summary(attacked, train_batch, chunk),
        "final_loss": float(result.history[-1]["loss"]) if result.history else float("nan"),
        "eval_at_step": {str(k): v for k, v in sorted(at_step.items())},
    })
  return SoftPromptAttackResult(
      config=config,
      max_norm=max_norm,
      num_trained_parameters=num_params,
      before_eval=before_eval,
      before_train=before_train,
      runs=runs,
      summary=_spread(runs, "eval"),
  )
