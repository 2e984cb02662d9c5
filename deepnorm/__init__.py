"""deepnorm: very deep Transformers in JAX/Flax NNX, every normalization and its placement.

The public interface::

    from deepnorm import TransformerConfig, Transformer, deepnorm_coefficients
"""

from deepnorm.batch_norms import BatchNorm, PowerNorm
from deepnorm.config import ConfigError, TransformerConfig
from deepnorm.initializers import deepnorm_coefficients, subln_gamma
from deepnorm.norms import DyT, LayerNorm, RMSNorm, ScaleNorm, make_norm
from deepnorm.transformer import Block, Stack, Transformer

__all__ = [
    "BatchNorm", "Block", "ConfigError", "DyT", "LayerNorm", "PowerNorm", "RMSNorm", "ScaleNorm",
    "Stack", "Transformer",
    "TransformerConfig", "deepnorm_coefficients", "make_norm", "subln_gamma",
]
__version__ = "0.1.0"
