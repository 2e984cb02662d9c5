"""Post-LN baseline (Vaswani et al. 2017): x <- LN(x + F(x)), Xavier init, same shape and
optimizer as configs/deepnorm.py, so the two runs differ only in the residual scheme.

    python train.py --config=configs/post_ln.py --config.train.num_steps=50 --workdir=runs/post

Expect: RESULT_PLACEHOLDER
"""

from configs import base
from configs.deepnorm import MODEL, OPTIMIZER, TRAIN


def get_config(arg=None):
    return base.get_config(dict(MODEL, residual="post"), arg=arg, optimizer=OPTIMIZER,
                           train=TRAIN)
