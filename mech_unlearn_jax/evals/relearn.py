"""Relearning attack: does a small finetune on half the forget set bring the facts back?

METHOD §4. The forget set is split in halves by the caller; the attacked model is
finetuned on the first half toward the TRUE answers (plus the maintain and retain
terms, as the reference did), and the held-out second half is evaluated at the
requested steps (reference: 0, 10, 20). Two attackers:

  * "lora": low-rank adapters on every linear map of the blocks (reference: r=512,
    alpha=32, lr 2e-4, 20 steps, AdamW wd 0, cosine). The rank is capped per matrix
    by its smaller side (`LoraTrainable.effective_ranks` says what it became).
  * "full": full-rank finetuning of every block weight.

For CounterFact the attack trains toward the *true* target (the reference trained
toward the false one, which is not an attack). The unedited model under the same
attack is the control.

The caller passes `evaluate(model) -> dict` (e.g. forget/edit scores of the held-out
half in every valid format), so this module knows nothing of prompt formats.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Literal

from mech_unlearn_jax import progress
from mech_unlearn_jax import train as train_lib


def _default_training() -> train_lib.EditConfig:
  return train_lib.EditConfig(
      steps=20, lr=2e-4, weight_decay=0.0, forget_batch_size=8, maintain_batch_size=8,
      retain_batch_size=8, clip_norm=1.0,
  )


@dataclasses.dataclass(frozen=True)
class RelearnConfig:
  """One relearning attacker.

  Attributes:
    kind: "lora" or "full".
    rank, alpha: LoRA rank (capped per matrix) and scale numerator.
    training: optimizer settings (the forget term trains toward the true answers).
    eval_steps: steps after which the held-out half is evaluated (0 = before).
  """

  kind: Literal["lora", "full"] = "lora"
  rank: int = 512
  alpha: float = 32.0
  training: train_lib.EditConfig = dataclasses.field(default_factory=_default_training)
  eval_steps: tuple[int, ...] = (0, 10, 20)

  def __post_init__(self):
    if self.kind not in ("lora", "full"):
      raise ValueError(f"kind must be 'lora' or 'full', got {self.kind!r}")
    if self.rank < 1:
      raise ValueError(f"rank must be >= 1, got {self.rank}")
    if self.training.forget_loss != "inject":
      raise ValueError("training.forget_loss must be 'inject' (cross-entropy toward the true answers)")
    bad = [s for s in self.eval_steps if not 0 <= s <= self.training.steps]
    if bad:
      raise ValueError(f"eval_steps {bad} outside 0..training.steps={self.training.steps}")


def attack_trainable(model: Any, config: RelearnConfig, seed: int):
  """(params, trainable, update_mask) of the attacker."""
  if config.kind == "lora":
    return train_lib.lora_trainable(model, rank=config.rank, alpha=config.alpha, seed=seed)
  return train_lib.mask_trainable(model, train_lib.block_weights_mask(model))


def relearn_attack(
    model: Any,
    data: train_lib.EditData,
    evaluate: Callable[[Any], dict[str, Any]],
    config: RelearnConfig,
    seed: int = 0,
) -> dict[str, Any]:
  """Finetunes `model` on `data` (forget answers = TRUE answers); evaluates on the way.

  Args:
    model: the attacked (edited or unedited) model; not modified.
    data: pools: forget = first half toward the true answers, maintain, retain.
    evaluate: model -> JSON-able scores of the held-out half.
    config: the attacker.
    seed: data order and LoRA initialization.

  Returns:
    {"curve": {step: evaluate(...)}, "history": per-step metrics, "trained_parameters",
     "effective_ranks" (LoRA), "seconds"}.
  """
  started = time.time()
  training = dataclasses.replace(config.training, seed=seed)
  params, trainable, update_mask = attack_trainable(model, config, seed)
  curve: dict[str, Any] = {}
  if 0 in config.eval_steps:
    curve["0"] = evaluate(model)
  wanted = {s for s in config.eval_steps if s > 0}
  bar = progress.bar(total=training.steps, desc=f"relearn ({config.kind})", unit="step")

  def callback(step: int, current_params: Any) -> None:
    bar.update(step - bar.n)
    if step in wanted:
      curve[str(step)] = evaluate(trainable.merge(current_params))

  try:
    result = train_lib.train(
        params, trainable, data, training, update_mask=update_mask, callback=callback, log_fn=None,
    )
  finally:
    bar.close()
  out = {
      "kind": config.kind,
      "curve": curve,
      "history": result.history,
      "trained_parameters": train_lib.count_parameters(params),
      "seconds": time.time() - started,
  }
  if config.kind == "lora":
    out["effective_ranks"] = sorted(set(trainable.effective_ranks.values()))
  return out
