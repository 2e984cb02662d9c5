"""Why deep Transformers train or diverge, measured: the papers' figures as functions.

``grad_norms``     expected gradient norm per layer at initialization (Xiong et al. 2020, Fig. 3)
``update_norms``   ||F(x, theta_t) - F(x, theta_0)|| in early training (Wang et al. 2022, Fig. 4-5)
``stability_map``  final loss or divergence over scheme x depth x learning rate x warmup
``signal_prop``    per-layer token cosine similarity, stream growth, branch/skip ratio at init
``gns``            the norm layers' gradient noise scale against the whole model's (Gray et al. 2024)
``plotting``       their figures, one fixed colour per residual scheme

The same functions back the CLI (``python -m deepnorm.analysis COMMAND``, configs in
configs/analysis/) and the notebooks in notebooks/.
"""

from deepnorm.analysis import grad_norms, plotting, signal_prop, stability_map, update_norms
from deepnorm.analysis.batches import first, stacked_batches
from deepnorm.analysis.schemes import SCHEMES, scheme_config
from deepnorm.analysis.train_steps import optimizer_config

__all__ = ["SCHEMES", "first", "grad_norms", "optimizer_config", "plotting", "scheme_config",
           "signal_prop", "stability_map", "stacked_batches", "update_norms"]
