"""``python -m deepnorm.analysis depth-sweep``: DeepNet's Table 1 and depth figure at CPU
scale, scheme x depth x precision on the decoder-only byte LM.

    python -m deepnorm.analysis depth-sweep --config.analysis.workers=2 \
        --config.analysis.out=notebooks/results/depth_sweep

The model, optimizer and data blocks are the stability map's (configs/analysis/
stability_map.py: a 64-128-2 decoder, AdamW with DeepNet's betas 0.9/0.98, no weight decay,
linear warmup then a constant rate), so both commands' cells can share a directory.

Depth mapping: DeepNet's NL-NL encoder-decoder has 2N layers, so 6L-6L / 18L-18L / 50L-50L /
100L-100L are 12 / 36 / 100 / 200 decoder layers here. The translation task itself is out of
reach on a 2-core CPU (18L-18L: 15 minutes per 300 steps).
"""

from configs.analysis import common
from configs.analysis import stability_map

# DeepNet Table 1's baselines and DeepNorm (deepnorm.analysis.SCHEMES names): Post-LN, DS-Init,
# Admin, ReZero, R-Fixup, T-Fixup, Pre-LN, DLCL, NormFormer, DeepNorm.
TABLE1 = "post,dsinit,admin,rezero,fixup,tfixup,pre,dlcl,normformer,deepnorm"


def analysis_config():
    c = stability_map.analysis_config()
    c.residuals = TABLE1
    c.depths = "12,36"  # decoder layers; 2N for DeepNet's NL-NL (6L-6L, 18L-18L, ...)
    c.dtypes = "float32,float16"  # float16 = float16 matmuls with dynamic loss scaling
    # float16 rows only up to this depth (0 = no cap): XLA:CPU has no native float16 dots
    # (~1.3x float32's step at 100 layers); 12 fits the committed run's time budget.
    c.float16_max_depth = 12
    # DeepNet trains at 5e-4 with 4,000 warmup steps; at d=64 and 100 steps: 5e-4 and 4x it,
    # warmup a fifth of the run.
    c.lrs = "5e-4,2e-3"
    c.warmups = "20"
    c.steps = 100
    return c


def get_config(arg=None):
    config = common.get_config(arg=arg, model=stability_map.MODEL,
                               optimizer=stability_map.OPTIMIZER, analysis=analysis_config())
    with config.unlocked():
        for name in stability_map.PER_CELL:
            del config.optimizer[name]
    return config
