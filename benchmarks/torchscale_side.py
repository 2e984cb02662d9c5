"""The torchscale half of benchmarks/vs_torchscale.py: the same model and step in PyTorch.

torchscale 0.3.0 (Microsoft's DeepNet code) imports ``timm.models.layers.drop_path`` at import
time only for stochastic depth. timm 0.6.13 in turn imports torchvision, and PyPI's torchvision
does not load beside the CPU build of torch 2.13.0 on this machine ("operator torchvision::nms
does not exist"). So the ``bench`` extra does not install timm (torchscale is installed with
``--no-deps``, see benchmarks/README.md) and, when timm is missing or fails to import, this
module registers a stand-in ``timm.models.layers`` whose ``drop_path`` raises: the benchmark uses
drop_path_rate=0, where torchscale never builds a DropPath, so the stand-in is never called.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
import types

import numpy as np
import torch


def _install_timm_stand_in() -> None:
    if importlib.util.find_spec("timm") is not None:
        try:
            from timm.models.layers import drop_path  # noqa: F401
            return
        except Exception:  # noqa: BLE001 - timm present but its torchvision import fails
            for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
                del sys.modules[name]

    def drop_path(*args, **kwargs):
        raise RuntimeError("timm stand-in: drop_path is unavailable; keep drop_path_rate=0")

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    layers.drop_path = drop_path
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


_install_timm_stand_in()

from torchscale.architecture.config import EncoderConfig, EncoderDecoderConfig  # noqa: E402
from torchscale.architecture.encoder import Encoder  # noqa: E402
from torchscale.architecture.encoder_decoder import EncoderDecoder  # noqa: E402


class FixedSinusoidalPositions(torch.nn.Module):
    """The same constant sin/cos table the JAX model adds (deepnorm.transformer), no params."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.register_buffer("table", torch.from_numpy(table))

    def forward(self, tokens, **kwargs):
        return self.table[: tokens.shape[1]][None]


class TorchscaleTrainer:
    """torchscale's DeepNorm model (deepnorm=True), tied embeddings, cross-entropy, Adam.

    Mirrors the deepnorm model exactly in what is computed: token embedding scaled by
    sqrt(d) plus the fixed sinusoidal positions; Post-LN DeepNorm layers (LN(alpha x + F(x)));
    4 heads, d_ff = 4 d, GELU, biases; the output head tied to the embedding; mean token
    cross-entropy; Adam. Dropout 0, no activation checkpointing. float32, or with
    ``dtype="bfloat16"`` torch's CPU autocast (matmuls in bfloat16 on oneDNN, float32 parameters,
    norms and loss): PyTorch's counterpart of deepnorm's bfloat16 matmuls.
    """

    def __init__(self, *, arch: str, d_model: int, num_heads: int, d_ff: int, layers: int,
                 dec_layers: int, vocab: int, batch: dict, positions: np.ndarray,
                 lr: float = 1e-4, fused_adam: bool = True, seed: int = 0,
                 dtype: str = "float32"):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={dtype!r} is not one of float32, bfloat16")
        torch.manual_seed(seed)
        self.arch = arch
        self.autocast = dtype == "bfloat16"
        common = dict(vocab_size=vocab, deepnorm=True, no_scale_embedding=False, dropout=0.0,
                      attention_dropout=0.0, activation_dropout=0.0, drop_path_rate=0.0,
                      activation_fn="gelu")
        embed = torch.nn.Embedding(vocab, d_model)
        torch.nn.init.normal_(embed.weight, std=d_model ** -0.5)
        head = torch.nn.Linear(d_model, vocab, bias=False)
        head.weight = embed.weight  # tied, like tie_embeddings=True on the JAX side
        if arch == "encoder":
            args = EncoderConfig(encoder_embed_dim=d_model, encoder_attention_heads=num_heads,
                                 encoder_ffn_embed_dim=d_ff, encoder_layers=layers, **common)
            self.model = Encoder(args, embed_tokens=embed,
                                 embed_positions=FixedSinusoidalPositions(positions),
                                 output_projection=head)
        elif arch == "encoder_decoder":
            args = EncoderDecoderConfig(
                encoder_embed_dim=d_model, encoder_attention_heads=num_heads,
                encoder_ffn_embed_dim=d_ff, encoder_layers=layers,
                decoder_embed_dim=d_model, decoder_attention_heads=num_heads,
                decoder_ffn_embed_dim=d_ff, decoder_layers=dec_layers,
                share_all_embeddings=True, **common)
            pos = FixedSinusoidalPositions(positions)
            self.model = EncoderDecoder(args, encoder_embed_tokens=embed,
                                        encoder_embed_positions=pos,
                                        decoder_embed_tokens=embed,
                                        decoder_embed_positions=pos, output_projection=head)
        else:
            raise ValueError(f"arch={arch!r} is not one of encoder, encoder_decoder")
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, fused=fused_adam)
        self.vocab = vocab
        self.batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
        self.batch = {k: v.long() if v.dtype == torch.int32 else v for k, v in self.batch.items()}

    def _loss(self):
        b = self.batch
        if self.arch == "encoder":
            logits = self.model(b["inputs"], encoder_padding_mask=b["inputs"].eq(0))[
                "encoder_out"]
        else:
            logits, _ = self.model(b["inputs"], b["decoder_inputs"])
        per_token = torch.nn.functional.cross_entropy(
            logits.reshape(-1, self.vocab), b["targets"].reshape(-1), reduction="none")
        w = b["weights"].reshape(-1)
        return (per_token * w).sum() / w.sum().clamp(min=1.0)

    def run(self, n: int = 1) -> float:
        loss = None
        for _ in range(n):
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                loss = self._loss()
            loss.backward()
            self.opt.step()
        return float(loss.detach())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def matmul_rate(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """torch's n^3 matmul rate on this machine, FLOP/s (median), for the table note."""
    a, b = (torch.randn(n, n).to(getattr(torch, dtype)) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)




def build(kwargs: dict) -> TorchscaleTrainer:
    """A TorchscaleTrainer from plain arguments, with the thread count set (for a Worker)."""
    kwargs = dict(kwargs)
    set_threads(kwargs.pop("threads"))
    return TorchscaleTrainer(**kwargs)
