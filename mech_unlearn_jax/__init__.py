"""mech_unlearn_jax: mechanistic localization, editing and unlearning of facts in JAX.

Localize the components of a language model that carry a fact, edit or unlearn it by
training only those parameters, and measure how robust the edit is and what it costs.

The most used entry points are re-exported here; submodules hold the rest:
`models` (penzai transformer, loaders, tokenizer), `data` (facts, formats, splits,
retain text), `interventions`, `localize` (attribution patching, causal tracing, fact
lookup, masks, baselines), `train` (trainables, losses, step, loop, checkpoints),
`evals`, `experiment`, `sharding`.
"""

from mech_unlearn_jax.batch import FactBatch, make_fact_batch
from mech_unlearn_jax.evals.scoring import score_facts
from mech_unlearn_jax.experiment import ExperimentSpec, run_experiment
from mech_unlearn_jax.models.config import PRESETS, TransformerConfig, get_preset
from mech_unlearn_jax.models.forward import last_logits, left_pad
from mech_unlearn_jax.models.loaders import load_model
from mech_unlearn_jax.models.tokenizer import Tokenizer
from mech_unlearn_jax.models.transformer import CausalLM, build_transformer
# `edit`, not `train`: the name `train` stays the subpackage.
from mech_unlearn_jax.train import EditConfig, EditData, TextBatch, edit

__all__ = [
    "CausalLM", "EditConfig", "EditData", "ExperimentSpec", "FactBatch", "PRESETS",
    "TextBatch", "Tokenizer", "TransformerConfig", "build_transformer", "edit",
    "get_preset", "last_logits", "left_pad", "load_model", "make_fact_batch",
    "run_experiment", "score_facts",
]
