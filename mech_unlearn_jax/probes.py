"""One linear-probe implementation: multinomial logistic regression per layer.

Used by fact-lookup localization (`localize/probes.py`: where does the attribute
become decodable?) and by the latent-knowledge evaluation (`evals/latent.py`: is the
attribute still decodable after an edit?). Inputs are activations stacked over
layers, `acts_LxNxD` (L layers, N examples, D features), and integer class labels.

A probe standardizes its features (mean and scale from its training examples: the
residual stream has a few huge dimensions, and unscaled they would dominate Adam's
steps), then fits weights and biases by full-batch Adam on the mean cross-entropy
plus an L2 penalty on the weights. All layers are fit at once (one jitted scan;
each layer's probe gets its own gradient). Fitting is deterministic (zero
initialization, full batch); the seed of `ProbeConfig` only draws the stratified
train/test split of `train_and_evaluate`.

Accuracies come with a Wilson 95% interval (`accuracy_with_interval`), so a report can
say whether a probe is above chance.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mech_unlearn_jax.evals.formats_eval import wilson_interval


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Training settings of the logistic-regression probes.

  Attributes:
    l2: weight of the L2 penalty on the probe weights (added to the mean CE).
    steps: full-batch Adam steps.
    learning_rate: Adam learning rate.
    test_fraction: held-out share of examples (per class, stratified) in
      `train_and_evaluate`.
    seed: seeds that split.
  """

  l2: float = 1e-3
  steps: int = 300
  learning_rate: float = 0.05
  test_fraction: float = 0.25
  seed: int = 0

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"ProbeConfig.steps must be >= 1, got {self.steps}")
    if self.l2 < 0:
      raise ValueError(f"ProbeConfig.l2 must be >= 0, got {self.l2}")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearProbes:
  """One multinomial logistic-regression probe per layer (leading axis = layer)."""

  weights_LxDxC: jax.Array
  bias_LxC: jax.Array
  mean_LxD: jax.Array
  scale_LxD: jax.Array

  @property
  def num_layers(self) -> int:
    return int(self.weights_LxDxC.shape[0])

  def logits(self, acts_LxNxD) -> jax.Array:
    """[L, N, C] class logits of standardized activations."""
    x = (jnp.asarray(acts_LxNxD, jnp.float32) - self.mean_LxD[:, None]) / self.scale_LxD[:, None]
    return jnp.einsum("lnd,ldc->lnc", x, self.weights_LxDxC) + self.bias_LxC[:, None]

  def predict(self, acts_LxNxD) -> np.ndarray:
    """[L, N] predicted class per layer and example."""
    return np.asarray(jnp.argmax(self.logits(acts_LxNxD), axis=-1))

  def accuracy(self, acts_LxNxD, labels_N) -> np.ndarray:
    """[L] fraction of examples whose predicted class equals `labels_N`."""
    labels = np.asarray(labels_N)
    return (self.predict(acts_LxNxD) == labels[None]).mean(axis=1)


def accuracy_with_interval(
    predictions_LxN: np.ndarray, labels_N, z: float = 1.96
) -> tuple[np.ndarray, np.ndarray]:
  """Per-layer accuracy [L] and its Wilson interval [L, 2] (z = 1.96: 95%).

  With no examples the accuracy is NaN and the interval [0, 1].
  """
  predictions = np.asarray(predictions_LxN)
  labels = np.asarray(labels_N)
  n = labels.shape[0]
  if predictions.ndim != 2 or predictions.shape[1] != n:
    raise ValueError(f"predictions_LxN has shape {predictions.shape}, expected [layers, {n}]")
  correct = (predictions == labels[None]).sum(axis=1)
  accuracy = correct / n if n else np.full(predictions.shape[0], np.nan)
  interval = np.array([wilson_interval(float(c), n, z) for c in correct]).reshape(-1, 2)
  return accuracy, interval


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


def check_labels(labels_N, num_classes: int, what: str = "labels") -> np.ndarray:
  """int32 labels; ValueError unless 1-D and in 0..num_classes-1."""
  labels = np.asarray(labels_N)
  if labels.ndim != 1:
    raise ValueError(f"{what} must be 1-D, got shape {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{what} must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
  return labels.astype(np.int32)


def fit_probes(
    acts_LxNxD, labels_N, num_classes: int, config: ProbeConfig = ProbeConfig()
) -> LinearProbes:
  """Fits one probe per layer on all given examples."""
  acts = np.asarray(acts_LxNxD, dtype=np.float32)
  labels = check_labels(labels_N, num_classes)
  if acts.ndim != 3 or acts.shape[1] != labels.shape[0]:
    raise ValueError(
        f"acts_LxNxD has shape {acts.shape}, expected [layers, {labels.shape[0]}, dim]"
    )
  if not labels.size:
    raise ValueError("fit_probes needs at least one example")
  return _fit(
      jnp.asarray(acts), jnp.asarray(labels), config.l2, config.learning_rate,
      num_classes=num_classes, steps=config.steps,
  )


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """Probes fit on a seeded split, with their accuracy per layer.

  Attributes:
    probes: the fitted probes.
    train_accuracy, test_accuracy: [L] accuracies (test is NaN without a test split).
    train_index, test_index: the example indices of each part.
    test_interval: [L, 2] Wilson 95% interval of the test accuracy.
  """

  probes: LinearProbes
  train_accuracy: np.ndarray
  test_accuracy: np.ndarray
  train_index: np.ndarray
  test_index: np.ndarray
  test_interval: np.ndarray | None = None

  def to_json(self) -> dict:
    out = {
        "train_accuracy": [float(a) for a in self.train_accuracy],
        "test_accuracy": [float(a) for a in self.test_accuracy],
        "num_train": int(self.train_index.size),
        "num_test": int(self.test_index.size),
    }
    if self.test_interval is not None:
      out["test_interval95"] = [[float(lo), float(hi)] for lo, hi in self.test_interval]
    return out


def train_and_evaluate(
    acts_LxNxD, labels_N, num_classes: int, config: ProbeConfig = ProbeConfig()
) -> ProbeResult:
  """Splits (seeded, stratified), fits per-layer probes, reports train/test accuracy."""
  acts = np.asarray(acts_LxNxD, dtype=np.float32)
  labels = check_labels(labels_N, num_classes)
  train, test = split_indices(labels, config.test_fraction, config.seed)
  probes = fit_probes(acts[:, train], labels[train], num_classes, config)
  train_acc = probes.accuracy(acts[:, train], labels[train])
  test_acc, test_interval = accuracy_with_interval(
      probes.predict(acts[:, test]) if test.size else np.zeros((acts.shape[0], 0), np.int64),
      labels[test],
  )
  return ProbeResult(probes, np.asarray(train_acc), np.asarray(test_acc), train, test, test_interval)
