"""Pre-LN baseline (Xiong et al. 2020): x <- x + F(LN(x)), a final LN per stack, Xavier init,
same shape and optimizer as configs/deepnorm.py.

    python train.py --config=configs/pre_ln.py --config.train.num_steps=50 --workdir=runs/pre

Expect (measured on a 2-core CPU): exit 0 in ~50 s on 2 CPU cores; loss 5.29 at step
1 -> 3.26 at step 50, eval loss 2.90 (perplexity 18.1).
"""

from configs import base
from configs.deepnorm import MODEL, OPTIMIZER, TRAIN


def get_config(arg=None):
    return base.get_config(dict(MODEL, residual="pre"), arg=arg, optimizer=OPTIMIZER,
                           train=TRAIN)
