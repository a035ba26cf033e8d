"""Training generic over what is trained: edits (masked weights) and attacks alike.

Modules: `trainables` (the `Trainable` protocol, parameter masks and their one
validator, mask splits, LoRA), `soft_prompt` (soft-prompt and embedding-adapter
trainables), `losses` (edit/unlearn/retain losses and batches), `step` (config,
optimizer, the jitted step), `loop` (`train`, `edit`, data order, non-finite stops),
`checkpoint` (orbax checkpoints with metadata and history).

  params, trainable, update_mask = lora_trainable(model, rank=512, alpha=32, seed=0)
  result = train(params, trainable, data, config, update_mask=update_mask)
  model = result.model  # trainable.merge(result.params)
"""

from mech_unlearn_jax.train import checkpoint
from mech_unlearn_jax.train.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    load_trained_model,
)
from mech_unlearn_jax.train.losses import (
    EditBatch,
    EditLoss,
    TextBatch,
    answer_logprobs,
    injection_loss_sum,
    lm_loss_sum,
    lm_token_count,
    log_one_minus_prob,
    softmax_cross_entropy,
    unlearning_loss_sum,
)
from mech_unlearn_jax.train.loop import (
    EditData,
    NonFiniteError,
    TrainResult,
    edit,
    make_batch_fn,
    print_log,
    train,
)
from mech_unlearn_jax.train.soft_prompt import embedding_adapter_trainable, soft_prompt_trainable
from mech_unlearn_jax.train.step import (
    EditConfig,
    StepLoss,
    TrainState,
    abstract_state,
    accumulate_gradients,
    init_state,
    make_optimizer,
    optimizer_state_bytes,
    split_microbatches,
    train_step,
)
from mech_unlearn_jax.train.trainables import (
    LORA_TARGETS,
    LoraTrainable,
    LowRankAdapter,
    MaskError,
    MaskTrainable,
    ParamMask,
    Trainable,
    block_matrix_labels,
    block_weights_mask,
    count_parameters,
    lora_trainable,
    mask_trainable,
    validate_mask,
)

__all__ = [
    "CheckpointManager", "CheckpointMismatchError", "EditBatch", "EditConfig", "EditData",
    "EditLoss", "LORA_TARGETS", "LoraTrainable", "LowRankAdapter", "MaskError",
    "MaskTrainable", "NonFiniteError", "ParamMask", "StepLoss", "TextBatch", "TrainResult",
    "TrainState", "Trainable", "abstract_state", "accumulate_gradients", "answer_logprobs",
    "block_matrix_labels", "block_weights_mask", "checkpoint", "count_parameters", "edit",
    "embedding_adapter_trainable", "init_state", "injection_loss_sum", "lm_loss_sum",
    "lm_token_count", "load_trained_model", "log_one_minus_prob", "make_batch_fn",
    "make_optimizer", "mask_trainable", "optimizer_state_bytes", "print_log",
    "soft_prompt_trainable", "softmax_cross_entropy", "split_microbatches", "train",
    "train_step", "unlearning_loss_sum", "validate_mask",
]
