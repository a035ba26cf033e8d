"""Layer-wise linear probes on the residual stream.

Residual "layer" index r = 0 is the (scaled) token embedding, r = i + 1 the residual
stream after block i, so a model with n blocks has n + 1 probe layers. Activations
are read at one column per prompt: the subject's last token ("subject_last") or the
final prompt token ("final").

A probe is multinomial logistic regression on standardized activations (mean and
scale from the training split), trained full-batch with optax Adam and an L2 penalty
on the weights; all layers are trained at once (vmapped) in one jitted scan. The
train/test split is seeded and stratified by class.

The same probes serve as a latent-knowledge test after an edit: fit on the maintain
athletes' true sports (`fit_probes`), then `LinearProbes.accuracy` on the edited
athletes' activations against their true (or injected) sports.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from penzai import pz

from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models import forward
from mech_unlearn_jax.models.transformer import CausalLM

Position = Literal["subject_last", "final"]


# ----------------------------------------------------------------------------------
# Activations.


def subject_last_columns(subject_mask_BxL: np.ndarray) -> np.ndarray:
  """Column of each row's last subject token; ValueError if a row has none."""
  mask = np.asarray(subject_mask_BxL, dtype=bool)
  empty = np.flatnonzero(~mask.any(axis=1))
  if empty.size:
    raise ValueError(f"rows {empty[:5].tolist()} of subject_mask_BxL have no subject token")
  width = mask.shape[1]
  return (width - 1 - np.argmax(mask[:, ::-1], axis=1)).astype(np.int32)


def position_columns(batch: FactBatch, position: Position) -> np.ndarray:
  """[B] column index of `position` in each row of a left-padded batch."""
  if position == "subject_last":
    return subject_last_columns(batch.subject_mask_BxL)
  if position == "final":
    return np.full((batch.size,), batch.tokens_BxL.shape[1] - 1, dtype=np.int32)
  raise ValueError(f"position must be 'subject_last' or 'final', got {position!r}")


def residuals_by_layer(model: CausalLM, tokens_BxL, positions_BxL) -> list[pz.nx.NamedArray]:
  """Residual streams [embedding, after block 0, ..., after block n-1] (named arrays)."""
  tokens, positions = forward.named_inputs(tokens_BxL, positions_BxL)
  side = {"token_positions": positions}
  x = model.embed(tokens, **side)
  out = [x]
  for block in model.blocks.sublayers:
    x = block(x, **side)
    out.append(x)
  return out


def _residuals_at(unbound, params, tokens_BxL, positions_BxL, columns_BxK):
  model = pz.bind_variables(unbound, params)
  stream = residuals_by_layer(model, tokens_BxL, positions_BxL)
  cols = jnp.asarray(columns_BxK, jnp.int32)

  def gather(x):
    x_BxLxD = x.untag("batch", "seq", "embedding").unwrap()
    return jnp.take_along_axis(x_BxLxD, cols[:, :, None], axis=1)

  return jnp.stack([gather(x) for x in stream])


_jit_residuals_at = jax.jit(_residuals_at)


def residuals_at(model: CausalLM, tokens_BxL, positions_BxL, columns_BxK) -> jax.Array:
  """Residual stream at given columns for every layer: [n_layers + 1, B, K, D]."""
  unbound, params = pz.unbind_params(model, freeze=True)
  return _jit_residuals_at(unbound, params, tokens_BxL, positions_BxL, columns_BxK)


def batch_activations(
    model: CausalLM, batch: FactBatch, position: Position, chunk: int = 64
) -> np.ndarray:
  """[n_layers + 1, B, D] float32 activations at `position`, in chunks of prompts."""
  cols = position_columns(batch, position)
  parts = []
  for start in range(0, batch.size, chunk):
    stop = min(start + chunk, batch.size)
    acts = residuals_at(
        model,
        batch.tokens_BxL[start:stop],
        batch.positions_BxL[start:stop],
        cols[start:stop, None],
    )
    parts.append(np.asarray(acts[:, :, 0], dtype=np.float32))
  return np.concatenate(parts, axis=1)


# ----------------------------------------------------------------------------------
# Probes.


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Training settings of the logistic-regression probes.

  Attributes:
    l2: weight of the L2 penalty on the probe weights (added to the mean CE).
    steps: full-batch Adam steps.
    learning_rate: Adam learning rate.
    test_fraction: held-out share of examples (per class, stratified).
    seed: seeds the split.
  """

  l2: float = 1e-3
  steps: int = 300
  learning_rate: float = 0.05
  test_fraction: float = 0.25
  seed: int = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearProbes:
  """One multinomial logistic-regression probe per layer (leading axis = layer)."""

  weights_LxDxC: jax.Array
  bias_LxC: jax.Array
  mean_LxD: jax.Array
  scale_LxD: jax.Array

  def logits(self, acts_LxNxD) -> jax.Array:
    x = (jnp.asarray(acts_LxNxD) - self.mean_LxD[:, None]) / self.scale_LxD[:, None]
    return jnp.einsum("lnd,ldc->lnc", x, self.weights_LxDxC) + self.bias_LxC[:, None]

  def predict(self, acts_LxNxD) -> np.ndarray:
    return np.asarray(jnp.argmax(self.logits(acts_LxNxD), axis=-1))

  def accuracy(self, acts_LxNxD, labels_N) -> np.ndarray:
    """[L] fraction of examples whose predicted class equals `labels_N`."""
    labels = np.asarray(labels_N)
    return (self.predict(acts_LxNxD) == labels[None]).mean(axis=1)


def split_indices(
    labels_N: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Seeded split stratified by label: (train indices, test indices), both sorted."""
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  labels = np.asarray(labels_N)
  rng = np.random.default_rng(seed)
  test = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    rng.shuffle(idx)
    n_test = int(round(test_fraction * idx.size))
    # Keep at least one training example per class.
    n_test = min(n_test, idx.size - 1)
    test.extend(idx[:n_test].tolist())
  test = np.sort(np.asarray(test, dtype=np.int64))
  train = np.setdiff1d(np.arange(labels.size), test)
  return train, test


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(acts_LxNxD, labels_N, l2, learning_rate, *, num_classes, steps):
  acts = acts_LxNxD.astype(jnp.float32)
  mean = acts.mean(axis=1)
  # Residual streams have a few huge dimensions; standardizing keeps Adam well scaled.
  scale = acts.std(axis=1) + 1e-6
  x = (acts - mean[:, None]) / scale[:, None]
  onehot = jax.nn.one_hot(labels_N, num_classes)
  num_layers, _, dim = acts.shape
  params = (
      jnp.zeros((num_layers, dim, num_classes), jnp.float32),
      jnp.zeros((num_layers, num_classes), jnp.float32),
  )

  def loss_fn(params):
    w, b = params
    logits = jnp.einsum("lnd,ldc->lnc", x, w) + b[:, None]
    ce = -(onehot[None] * jax.nn.log_softmax(logits)).sum(-1).mean(-1)
    # Sum over layers: the layers' probes are independent, so each gets its own gradient.
    return (ce + l2 * (w**2).sum(axis=(1, 2))).sum()

  tx = optax.adam(learning_rate)

  def step(carry, _):
    params, opt_state = carry
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return LinearProbes(params[0], params[1], mean, scale)


def fit_probes(
    acts_LxNxD, labels_N, num_classes: int, config: ProbeConfig = ProbeConfig()
) -> LinearProbes:
  """Fits one probe per layer on all given examples."""
  acts = np.asarray(acts_LxNxD, dtype=np.float32)
  labels = np.asarray(labels_N, dtype=np.int32)
  if acts.ndim != 3 or acts.shape[1] != labels.shape[0]:
    raise ValueError(
        f"acts_LxNxD has shape {acts.shape}, expected [layers, {labels.shape[0]}, dim]"
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in 0..{num_classes - 1}")
  return _fit(
      jnp.asarray(acts), jnp.asarray(labels), config.l2, config.learning_rate,
      num_classes=num_classes, steps=config.steps,
  )


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """Probes fit on a seeded split, with their accuracy per layer."""

  probes: LinearProbes
  train_accuracy: np.ndarray
  test_accuracy: np.ndarray
  train_index: np.ndarray
  test_index: np.ndarray

  def to_json(self) -> dict:
    return {
        "train_accuracy": [float(a) for a in self.train_accuracy],
        "test_accuracy": [float(a) for a in self.test_accuracy],
        "num_train": int(self.train_index.size),
        "num_test": int(self.test_index.size),
    }


def train_and_evaluate(
    acts_LxNxD, labels_N, num_classes: int, config: ProbeConfig = ProbeConfig()
) -> ProbeResult:
  """Splits (seeded, stratified), fits per-layer probes, reports train/test accuracy."""
  acts = np.asarray(acts_LxNxD, dtype=np.float32)
  labels = np.asarray(labels_N, dtype=np.int32)
  train, test = split_indices(labels, config.test_fraction, config.seed)
  probes = fit_probes(acts[:, train], labels[train], num_classes, config)
  train_acc = probes.accuracy(acts[:, train], labels[train])
  test_acc = (
      probes.accuracy(acts[:, test], labels[test]) if test.size
      else np.full(acts.shape[0], np.nan)
  )
  return ProbeResult(probes, np.asarray(train_acc), np.asarray(test_acc), train, test)


def probe_curve(
    model: CausalLM,
    batch: FactBatch,
    labels_N,
    num_classes: int,
    position: Position = "subject_last",
    config: ProbeConfig = ProbeConfig(),
) -> ProbeResult:
  """Probe accuracy per residual layer at `position` of each prompt."""
  acts = batch_activations(model, batch, position)
  return train_and_evaluate(acts, labels_N, num_classes, config)
