"""Latent-knowledge probes: is an edited fact still linearly decodable? (METHOD §4)

Per residual layer (r = 0: the embedding output, i.e. the input of block 0; r = i + 1:
the output of block i), the residual stream at the last prompt token of the standard
prompt. Per layer, a logistic-regression probe (`mech_unlearn_jax/probes.py`) is fit
on the maintain-train facts' true classes (e.g. sports), scored on held-out maintain
facts (is the probe any good?), then applied to the forget facts: accuracy against
their true class (high = the knowledge is still there, whatever the output says) and
against their edit-target class (high = the edit rewrote the representation too).

A probe cannot predict a class it was never fit on, so each accuracy counts only the
held-out and forget rows whose class occurs among the training labels (`num_heldout`,
`num_forget_true`, `num_forget_edit` say how many): a whole-sport edit's true sport is absent from the
maintain facts (the caller then fits on the edit's training half too,
`experiment/robustness.py`), and CounterFact has hundreds of answer classes that a
few hundred training facts do not all cover. The class prior is reported beside the
accuracies (`prior_true`, `prior_edit`: what always predicting the most frequent
training class scores on the same rows), since with many unbalanced classes it is
far above 1 / num_classes.

Two ways to get the probes:
  * "retrained": fit on the edited model's own activations of the maintain-train facts
    (asks: can the edited model's representation be read linearly at all?).
  * "transfer" (when the unedited model is given): fit on the unedited model's
    activations and applied to the edited model's (asks: does the edited model still
    write the attribute the way the original did?). It costs one more pass over the
    maintain-train facts only.

All layers are captured in one forward pass per chunk (`interventions.capture_traced`
at "resid_pre" of block 0 and "resid_post" of every block, no unembedding), in one
cached jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax import probes as probes_lib
from mech_unlearn_jax import sharding
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models.transformer import CausalLM


# ----------------------------------------------------------------------------------
# Activations.


def residual_sites(num_layers: int) -> tuple[iv.Site, ...]:
  """The n + 1 probed sites: block 0's input, then every block's output."""
  return (iv.Site(0, "resid_pre"),) + tuple(iv.Site(i, "resid_post") for i in range(num_layers))


def _last_token_residuals(unbound, params, tokens_BxL, positions_BxL):
  model = pz.bind_variables(unbound, params)
  sites = residual_sites(model.config.num_layers)
  captured = iv.capture_traced(model, sites, tokens_BxL, positions_BxL)
  # Left-padded batches end every row at column -1; slicing inside the jit lets XLA
  # keep only that column of each layer's stream.
  return jnp.stack([
      captured[s].untag("batch", "seq", "embedding").unwrap()[:, -1].astype(jnp.float32)
      for s in sites
  ])


_jit_last_token_residuals = jax.jit(_last_token_residuals)


def last_token_residuals(model: Any, batch: FactBatch, chunk_size: int = 64) -> np.ndarray:
  """[n_layers + 1, B, D] float32 residual stream at each prompt's last token.

  Chunks are padded to `chunk_size` rows (repeating the last row) so a long batch
  compiles once.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  unbound, params = sharding.unbind_for_jit(model)
  size = min(chunk_size, batch.size)
  parts = []
  for start in range(0, batch.size, size):
    stop = min(start + size, batch.size)
    tokens = np.asarray(batch.tokens_BxL[start:stop])
    positions = np.asarray(batch.positions_BxL[start:stop])
    n = stop - start
    if n < size:
      tokens = np.concatenate([tokens, np.repeat(tokens[-1:], size - n, 0)])
      positions = np.concatenate([positions, np.repeat(positions[-1:], size - n, 0)])
    acts = _jit_last_token_residuals(unbound, params, tokens, positions)
    parts.append(sharding.to_host(acts)[:, :n])
  return np.concatenate(parts, axis=1)


# ----------------------------------------------------------------------------------
# Evaluation.

# Recorded with every result; stored results of another protocol are recomputed. 3:
# the held-out maintain accuracy, too, counts only rows of classes the probes were fit
# on (CounterFact: hundreds of answer classes, many held-out ones unseen). 2: forget
# rows likewise, and the class prior reported. 1 (unversioned): every row counted.
PROBE_PROTOCOL = 3


@dataclasses.dataclass(frozen=True)
class LatentProbeConfig:
  """Settings of `latent_probe_eval`.

  Attributes:
    probe: probe training settings (its split settings are unused: the maintain-train
      and held-out facts are given explicitly).
    chunk_size: prompts per forward pass.
    transfer: also fit probes on the unedited model and apply them to the edited one
      (only when `base_model` is given).
  """

  probe: probes_lib.ProbeConfig = probes_lib.ProbeConfig()
  chunk_size: int = 64
  transfer: bool = True

  def to_json(self) -> dict[str, Any]:
    return {"probe": self.probe.to_json(), "chunk_size": self.chunk_size, "transfer": self.transfer}


def _layer_list(x) -> list[float]:
  return [float(v) for v in np.asarray(x)]


def _interval_list(x) -> list[list[float]]:
  return [[float(lo), float(hi)] for lo, hi in np.asarray(x)]


@dataclasses.dataclass(frozen=True)
class LatentProbeScores:
  """Per-layer accuracies ([n_layers + 1] arrays) of one set of probes.

  Attributes:
    train_accuracy: on the facts the probes were fit on.
    heldout_accuracy, heldout_interval: on held-out maintain facts ([L], [L, 2]),
      over the rows whose class the probes were fit on (None if none is).
    forget_true_accuracy, forget_true_interval: forget facts vs their true class,
      over the rows whose true class the probes were fit on (None if none is).
    forget_edit_accuracy, forget_edit_interval: forget facts vs their edit-target
      class, over the rows whose target the probes were fit on (None without targets).
    num_forget_true, num_forget_edit, num_heldout: how many rows each is over
      (`LatentProbeResult.num_heldout` counts every held-out row).
  """

  train_accuracy: np.ndarray
  heldout_accuracy: np.ndarray | None
  heldout_interval: np.ndarray | None
  forget_true_accuracy: np.ndarray | None
  forget_true_interval: np.ndarray | None
  forget_edit_accuracy: np.ndarray | None = None
  forget_edit_interval: np.ndarray | None = None
  num_forget_edit: int = 0
  num_forget_true: int = 0
  num_heldout: int = 0

  def means(self) -> dict[str, float]:
    """Mean and max over layers of each accuracy (max: the most decodable layer)."""
    out = {}
    for name in ("train", "heldout", "forget_true", "forget_edit"):
      acc = getattr(self, f"{name}_accuracy")
      if acc is not None:
        out[f"{name}_mean"] = float(np.mean(acc))
        out[f"{name}_max"] = float(np.max(acc))
    return out

  def to_json(self) -> dict[str, Any]:
    out = {
        "train_accuracy": _layer_list(self.train_accuracy),
        "heldout_accuracy": None if self.heldout_accuracy is None else _layer_list(self.heldout_accuracy),
        "heldout_interval95": None if self.heldout_interval is None else _interval_list(self.heldout_interval),
        "num_heldout": self.num_heldout,
        "forget_true_accuracy": None,
        "forget_true_interval95": None,
        "num_forget_true": self.num_forget_true,
        "forget_edit_accuracy": None,
        "forget_edit_interval95": None,
        "num_forget_edit": self.num_forget_edit,
        "summary": self.means(),
    }
    if self.forget_true_accuracy is not None:
      out["forget_true_accuracy"] = _layer_list(self.forget_true_accuracy)
      out["forget_true_interval95"] = _interval_list(self.forget_true_interval)
    if self.forget_edit_accuracy is not None:
      out["forget_edit_accuracy"] = _layer_list(self.forget_edit_accuracy)
      out["forget_edit_interval95"] = _interval_list(self.forget_edit_interval)
    return out


@dataclasses.dataclass(frozen=True)
class LatentProbeResult:
  """`latent_probe_eval`'s result: retrained (and optionally transfer) probe scores.

  Layer r = 0 is the embedding output, r = i + 1 the output of block i.
  """

  retrained: LatentProbeScores
  transfer: LatentProbeScores | None
  num_classes: int
  num_train: int
  num_heldout: int
  num_forget: int
  chance: float
  prior_true: float | None = None
  prior_edit: float | None = None

  @property
  def num_layers(self) -> int:
    """Probed residual layers (model blocks + 1)."""
    return int(self.retrained.train_accuracy.shape[0])

  def to_json(self) -> dict[str, Any]:
    return {
        "protocol": PROBE_PROTOCOL,
        "layers": ["embedding"] + [f"block_{i}" for i in range(self.num_layers - 1)],
        "num_classes": self.num_classes,
        "chance": self.chance,
        "num_train": self.num_train,
        "num_heldout": self.num_heldout,
        "num_forget": self.num_forget,
        "prior_true": self.prior_true,
        "prior_edit": self.prior_edit,
        "retrained": self.retrained.to_json(),
        "transfer": None if self.transfer is None else self.transfer.to_json(),
    }


def score_probes(
    probes: probes_lib.LinearProbes,
    train_acts, train_labels,
    heldout_acts, heldout_labels,
    forget_acts, forget_true_labels,
    forget_edit_labels=None,
) -> LatentProbeScores:
  """Accuracies of fitted probes on the train, held-out and forget activations.

  Held-out and forget labels of -1 (a class the probes were not fit on) are left out
  of that accuracy; with no row left it is None.
  """

  def scored(predictions, labels):
    if labels is None:
      return None, None, 0
    labels = np.asarray(labels)
    keep = labels >= 0
    if not keep.any():
      return None, None, 0
    return (*probes_lib.accuracy_with_interval(predictions[:, keep], labels[keep]), int(keep.sum()))

  heldout_acc, heldout_int, num_heldout = scored(probes.predict(heldout_acts), heldout_labels)
  forget_pred = probes.predict(forget_acts)
  true_acc, true_int, num_true = scored(forget_pred, forget_true_labels)
  edit_acc, edit_int, num_edit = scored(forget_pred, forget_edit_labels)
  return LatentProbeScores(
      train_accuracy=np.asarray(probes.accuracy(train_acts, train_labels)),
      heldout_accuracy=heldout_acc,
      heldout_interval=heldout_int,
      num_heldout=num_heldout,
      forget_true_accuracy=true_acc,
      forget_true_interval=true_int,
      forget_edit_accuracy=edit_acc,
      forget_edit_interval=edit_int,
      num_forget_edit=num_edit,
      num_forget_true=num_true,
  )


def _unseen_to_minus_one(labels: np.ndarray, seen: np.ndarray) -> np.ndarray:
  """-1 where a label is not among the training labels (the probe cannot predict it)."""
  return np.where(np.isin(labels, seen), labels, -1).astype(np.int32)


def _prior_accuracy(labels: np.ndarray | None, majority: int) -> float | None:
  """Accuracy of always predicting `majority` on the rows with a label (>= 0)."""
  if labels is None or not (labels >= 0).any():
    return None
  return float(np.mean(labels[labels >= 0] == majority))


def _labels_for(batch: FactBatch, labels, num_classes: int, what: str) -> np.ndarray:
  labels = probes_lib.check_labels(labels, num_classes, what)
  if labels.shape[0] != batch.size:
    raise ValueError(f"{what} has {labels.shape[0]} labels for a batch of {batch.size} prompts")
  return labels


def latent_probe_eval(
    model: CausalLM,
    train_batch: FactBatch,
    train_labels,
    heldout_batch: FactBatch,
    heldout_labels,
    forget_batch: FactBatch,
    forget_true_labels,
    forget_edit_labels,
    num_classes: int,
    config: LatentProbeConfig = LatentProbeConfig(),
    *,
    base_model: CausalLM | None = None,
) -> LatentProbeResult:
  """Per-layer latent-knowledge probes of `model` (usually an edited model).

  Args:
    model: the model whose representation is probed.
    train_batch, train_labels: maintain-train prompts (standard format) and their true
      classes in 0..num_classes-1 (the probes' training data).
    heldout_batch, heldout_labels: held-out maintain prompts and true classes.
    forget_batch, forget_true_labels: the edited facts' prompts and true classes.
    forget_edit_labels: their edit-target classes, or None (pure unlearning). -1
      marks a target outside the probe's classes. Held-out and forget rows whose
      (true or target) class does not occur in `train_labels` are left out of that accuracy (a probe cannot
      predict a class it never saw; e.g. golf for a probe trained on three sports),
      and with no row left there is no such accuracy.
    num_classes: number of classes.
    config: probe and batching settings.
    base_model: the unedited model; with `config.transfer`, probes fit on its
      activations are also applied to `model`'s ("transfer").

  Returns:
    LatentProbeResult with per-layer accuracies and their means.
  """
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  train_labels = _labels_for(train_batch, train_labels, num_classes, "train_labels")
  heldout_labels = _labels_for(heldout_batch, heldout_labels, num_classes, "heldout_labels")
  forget_true = _labels_for(forget_batch, forget_true_labels, num_classes, "forget_true_labels")
  forget_edit = None
  if forget_edit_labels is not None:
    edit = np.asarray(forget_edit_labels)
    out_of_range = edit.size > 0 and (edit.min() < -1 or edit.max() >= num_classes)
    if edit.shape != (forget_batch.size,) or out_of_range:
      raise ValueError(
          f"forget_edit_labels must be {forget_batch.size} labels in -1..{num_classes - 1}"
          f" (-1: not a probe class), got shape {edit.shape}"
          + (f", values {edit.min()}..{edit.max()}" if edit.size else "")
      )
    forget_edit = edit.astype(np.int32)
  seen = np.unique(train_labels)
  heldout_labels = _unseen_to_minus_one(heldout_labels, seen)
  forget_true = _unseen_to_minus_one(forget_true, seen)
  if forget_edit is not None:
    forget_edit = _unseen_to_minus_one(forget_edit, seen)
    if not (forget_edit >= 0).any():
      forget_edit = None
  majority = int(np.bincount(train_labels, minlength=num_classes).argmax())

  acts = lambda m, b: last_token_residuals(m, b, config.chunk_size)
  train_acts = acts(model, train_batch)
  heldout_acts = acts(model, heldout_batch)
  forget_acts = acts(model, forget_batch)
  probes = probes_lib.fit_probes(train_acts, train_labels, num_classes, config.probe)
  retrained = score_probes(
      probes, train_acts, train_labels, heldout_acts, heldout_labels, forget_acts, forget_true, forget_edit
  )
  transfer = None
  if base_model is not None and config.transfer:
    base_train_acts = acts(base_model, train_batch)
    base_probes = probes_lib.fit_probes(base_train_acts, train_labels, num_classes, config.probe)
    transfer = score_probes(
        base_probes, base_train_acts, train_labels, heldout_acts, heldout_labels,
        forget_acts, forget_true, forget_edit,
    )
  return LatentProbeResult(
      retrained=retrained,
      transfer=transfer,
      num_classes=num_classes,
      num_train=train_batch.size,
      num_heldout=heldout_batch.size,
      num_forget=forget_batch.size,
      chance=1.0 / num_classes,
      prior_true=_prior_accuracy(forget_true, majority),
      prior_edit=_prior_accuracy(forget_edit, majority),
  )
