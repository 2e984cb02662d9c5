"""The model's configuration: one frozen dataclass, validated once when it is built.

Every invalid combination raises :class:`ConfigError` with one line naming the bad value and
what is allowed, so a mistyped experiment fails before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from deepnorm import residual as residual_lib

ARCHS = ("encoder", "decoder", "encoder_decoder")
NORMS = ("layernorm", "rmsnorm", "scalenorm", "dyt", "unitnorm", "none", "batchnorm",
         "powernorm")
# The norms with batch statistics (deepnorm.batch_norms): running statistics in the train state.
BATCH_STAT_NORMS = ("batchnorm", "powernorm")
# The residual schemes declared in deepnorm.residual, in declaration order, as of import; the
# config checks against the live registry, so a scheme registered later is accepted too.
RESIDUALS = tuple(residual_lib.SCHEMES)
INITS = ("auto", "xavier", "deepnorm", "subln", "tfixup", "dsinit", "fixup")
REMAT_POLICIES = ("auto", "none", "full", "save_dots", "save_dots_no_batch")
ACTIVATIONS = ("gelu", "relu")
POSITIONS = ("sinusoidal", "learned")
DTYPES = ("float32", "bfloat16", "float16")
# The inputs cuDNN's flash attention takes (jax refuses float32 q/k/v for implementation="cudnn").
CUDNN_ATTENTION_DTYPES = ("bfloat16", "float16")
# What float32 dots ask of the backend (deepnorm.ops.MATMUL_PRECISIONS): full float32, TF32,
# or the backend's fastest (TF32 on GPU, one bfloat16 pass on TPU).
MATMUL_PRECISIONS = ("float32", "tensorfloat32", "default")



class ConfigError(ValueError):
    """A configuration value that cannot work; the message names it and the allowed values."""


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"model.{name}={value!r} is not one of {', '.join(allowed)}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"model.{name}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape, normalization, residual placement and initialization of a Transformer.

    Normalization is three orthogonal choices: the norm function (``norm``), where it sits
    around the residual (``residual``, one declaration per scheme in ``deepnorm.residual``),
    and how the weights are initialized (``init``; ``"auto"`` picks the scheme's own: DeepNorm's
    derived init for ``residual="deepnorm"``, Magneto's for ``"subln"``, Fixup's for
    ``"fixup"``, Xavier otherwise).
    """

    arch: str = "decoder"  # encoder | decoder | encoder_decoder
    vocab_size: int = 260  # the byte-level default vocabulary (deepnorm.data.tokenizer)
    num_layers: int = 0  # layers of an encoder-only or decoder-only model
    num_encoder_layers: int = 0  # N, encoder_decoder only
    num_decoder_layers: int = 0  # M, encoder_decoder only
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 2048
    norm: str = "layernorm"
    residual: str = "pre"
    init: str = "auto"
    mixln_fraction: float = 0.25  # Mix-LN: share of layers (from the bottom) that are Post-LN
    # residual="rescaled": lambda in LN(lambda x + F(x)) (Liu et al.; 1 is Post-LN). 2 is this
    # codebase's default, not a value from the paper.
    skip_lambda: float = 2.0
    # norm="unitnorm": k in D^(k/2) x / ||x|| (Huang et al. 2024); 1 gives RMSNorm's output size.
    unitnorm_k: float = 1.0
    # QK-norm, orthogonal to the residual scheme: an RMSNorm with a learned scale over each
    # head's query and key before their dot product (deepnorm.layers.Attention).
    qk_norm: bool = False
    dropout_rate: float = 0.0  # on embeddings and on every branch output before its add
    activation: str = "gelu"
    positions: str = "sinusoidal"
    max_len: int = 2048  # only bounds learned position embeddings
    tie_embeddings: bool = True  # output head shares the token embedding
    use_bias: bool = True
    norm_eps: float = 1e-5
    # BatchNorm / PowerNorm (deepnorm.batch_norms): the running statistics' momentum alpha,
    # stat <- alpha stat + (1 - alpha) batch_stat (0.9: the PowerNorm authors' alpha_fwd and
    # alpha_bkw), and PowerNorm's warmup steps normalized by the batch's own quadratic mean
    # (0: Algorithm 1 as written; the authors' code passes its optimizer warmup, e.g. 8000).
    norm_momentum: float = 0.9
    norm_warmup: int = 0
    # Matmul input dtype: float32 | bfloat16 | float16. With bfloat16 / float16 the products are
    # summed and returned in float32 (ops.matmul); parameters, activations and norm statistics
    # are float32 either way. float16 trains with dynamic loss scaling (docs/precision.md).
    dtype: str = "float32"
    # What dots of float32 operands ask of the backend: float32 (lax.Precision.HIGHEST, the
    # same on every backend) | tensorfloat32 (HIGH) | default (the backend's fastest: TF32 on a
    # GPU, one bfloat16 pass on a TPU). docs/precision.md.
    matmul_precision: str = "float32"
    # What jax.checkpoint keeps per layer: auto|none|full|save_dots|save_dots_no_batch. "auto"
    # is resolved by the training setup (deepnorm.training.platform): save_dots on CPU in
    # float32, full on CPU in bfloat16 (the fastest there: docs/performance.md, "Remat policy") and full on a
    # GPU/TPU (the least memory). A model built with "auto" unresolved runs full everywhere.
    remat_policy: str = "auto"
    # False runs the layers as a Python loop: compile time grows with depth (~0.5 s a layer on
    # CPU), but there are no stacked scan buffers to fill, write and read. On the 2-core CPU that
    # was 6-10% less step time for d >= 256 encoders of 12-24 layers, no gain for the d=128
    # configs/deepnorm.py and 8% more at d=64 x 100 (docs/performance.md, "Depth"; "the unrolled
    # stack").
    scan_layers: bool = True
    # Layers per trip of the scan loop (jax.lax.scan's unroll). On the 2-core CPU 2 saved
    # 4-9% of the step at four of six encoder shapes x dtypes and cost 5% at d=64 in float32
    # (docs/performance.md, "Depth"), so it is a knob, not a default. The loop body grows
    # k-fold and compile time with it (1.3x at 2), still flat in depth.
    scan_unroll: int = 1
    # None: two einsums on CPU (faster there, same maths), jax.nn.dot_product_attention's own
    # choice elsewhere; "xla" / "cudnn" force that implementation of dot_product_attention
    # (deepnorm.ops.attention). "cudnn" needs dtype bfloat16: its kernel refuses float32.
    attention_impl: str | None = None

    def __post_init__(self) -> None:
        _choice("arch", self.arch, ARCHS)
        _choice("norm", self.norm, NORMS)
        _choice("residual", self.residual, tuple(residual_lib.SCHEMES))
        _choice("init", self.init, INITS)
        _choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("positions", self.positions, POSITIONS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ConfigError(
                f"model.attention_impl={self.attention_impl!r} is not one of None, xla, cudnn")
        if self.attention_impl == "cudnn" and self.dtype not in CUDNN_ATTENTION_DTYPES:
            allowed = ", ".join(d for d in DTYPES if d in CUDNN_ATTENTION_DTYPES)
            raise ConfigError(
                f"model.attention_impl='cudnn' needs model.dtype in {allowed} (cuDNN flash "
                f"attention takes bfloat16 / float16 only), got model.dtype={self.dtype!r}")
        for name in ("vocab_size", "d_model", "num_heads", "d_ff", "max_len", "scan_unroll"):
            _positive(name, getattr(self, name))
        if self.scan_unroll > 1 and not self.scan_layers:
            raise ConfigError(
                f"model.scan_unroll={self.scan_unroll} needs model.scan_layers=True (an "
                "unrolled stack has no loop to unroll)")
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads="
                f"{self.num_heads}")
        self._check_layer_counts()
        if not isinstance(self.qk_norm, bool):
            raise ConfigError(f"model.qk_norm={self.qk_norm!r} must be True or False")
        for name in ("mixln_fraction", "dropout_rate", "norm_eps", "skip_lambda", "unitnorm_k"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"model.{name}={value!r} must be a number")
        if not 0.0 <= self.mixln_fraction <= 1.0:
            raise ConfigError(f"model.mixln_fraction={self.mixln_fraction!r} must be in [0, 1]")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"model.dropout_rate={self.dropout_rate!r} must be in [0, 1)")
        if not self.skip_lambda > 0:
            raise ConfigError(f"model.skip_lambda={self.skip_lambda!r} must be positive")
        if not self.norm_eps > 0:
            raise ConfigError(f"model.norm_eps={self.norm_eps!r} must be positive")
        self._check_batch_stats()
        scheme = self.scheme
        if scheme.sphere_qk and self.qk_norm:
            raise ConfigError(
                f"model.qk_norm=True with model.residual={self.residual!r}, which normalizes "
                "q and k itself; set model.qk_norm=False")
        if not scheme.uses_norm and self.norm != "none":
            raise ConfigError(
                f"model.residual={self.residual!r} uses no normalization but "
                f"model.norm={self.norm!r}; set model.norm='none'")
        if scheme.uses_norm and self.norm == "none" and not scheme.norm_optional:
            allowed = [n for n, s in residual_lib.SCHEMES.items()
                       if s.norm_optional or not s.uses_norm]
            raise ConfigError(
                f"model.norm='none' only makes sense with residual {', '.join(allowed)} "
                f"(x + F(x) for T-Fixup, or a scheme with no norm), not {self.residual!r}")

    def _check_batch_stats(self) -> None:
        m, w = self.norm_momentum, self.norm_warmup
        if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0.0 <= m < 1.0:
            raise ConfigError(f"model.norm_momentum={m!r} must be a number in [0, 1)")
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise ConfigError(f"model.norm_warmup={w!r} must be a non-negative integer")
        if w and self.norm != "powernorm":
            raise ConfigError(f"model.norm_warmup={w} is PowerNorm's; model.norm={self.norm!r} "
                              "has no warmup")

    @property
    def batch_stats(self) -> bool:
        """Whether the norm keeps running statistics (BatchNorm, PowerNorm)."""
        return self.norm in BATCH_STAT_NORMS

    def _check_layer_counts(self) -> None:
        if self.arch == "encoder_decoder":
            _positive("num_encoder_layers", self.num_encoder_layers)
            _positive("num_decoder_layers", self.num_decoder_layers)
            if self.num_layers:
                raise ConfigError(
                    f"model.num_layers={self.num_layers} is not used by arch='encoder_decoder'; "
                    "set model.num_encoder_layers and model.num_decoder_layers instead")
            return
        _positive("num_layers", self.num_layers)
        for name in ("num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name):
                raise ConfigError(
                    f"model.{name}={getattr(self, name)} is not used by arch={self.arch!r}; "
                    "set model.num_layers instead")

    # Derived quantities -------------------------------------------------------------------

    @property
    def encoder_layers(self) -> int:
        """N in the DeepNet paper: the number of encoder layers (0 if there is no encoder)."""
        if self.arch == "encoder_decoder":
            return self.num_encoder_layers
        return self.num_layers if self.arch == "encoder" else 0

    @property
    def decoder_layers(self) -> int:
        """M in the DeepNet paper: the number of decoder layers (0 if there is no decoder)."""
        if self.arch == "encoder_decoder":
            return self.num_decoder_layers
        return self.num_layers if self.arch == "decoder" else 0

    @property
    def total_layers(self) -> int:
        return self.encoder_layers + self.decoder_layers

    @property
    def resolved_init(self) -> str:
        """The init actually used: ``"auto"`` follows the residual scheme's own paper."""
        if self.init != "auto":
            return self.init
        return self.scheme.init

    @property
    def scheme(self) -> residual_lib.Scheme:
        """The residual scheme's declaration (``deepnorm.residual``)."""
        return residual_lib.SCHEMES[self.residual]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "TransformerConfig":
        """Builds from a ConfigDict / dict, naming any key the model does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config key(s) {', '.join(unknown)}; known keys: "
                f"{', '.join(sorted(known))}")
        return cls(**dict(values))
