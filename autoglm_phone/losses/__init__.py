from autoglm_phone.losses.contrastive import itc_loss
from autoglm_phone.losses.itm import (
    caption_keys,
    hard_negative_weights,
    itm_accuracy,
    itm_loss,
    itm_targets,
    sample_hard_negatives,
    sample_hard_negatives_across_ranks,
)
from autoglm_phone.losses.lm import align_to_prefix, prefix_lm_loss
from autoglm_phone.losses.mlm import (
    mask_tokens,
    masked_accuracy,
    mlm_loss,
    token_counts,
    unigram_baseline_accuracy,
)

__all__ = [
    "align_to_prefix",
    "caption_keys",
    "hard_negative_weights",
    "itc_loss",
    "itm_accuracy",
    "itm_loss",
    "itm_targets",
    "mask_tokens",
    "masked_accuracy",
    "mlm_loss",
    "prefix_lm_loss",
    "sample_hard_negatives",
    "sample_hard_negatives_across_ranks",
    "token_counts",
    "unigram_baseline_accuracy",
]
