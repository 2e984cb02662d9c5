"""Admin's profiling pass (Liu et al. 2020, "Understanding the Difficulty of Training
Transformers"): set each residual weight omega_i from the branch variances at initialization.

Admin's rule is omega_i = sqrt(sum_{j<i} Var[f_j(x_{j-1})]) over the sublayers below i. We
count the stream entering the stack (the embedding) as the j = 0 term, so the first sublayer
gets omega = sqrt(Var[embedding]) instead of zero; the paper's sum is otherwise unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from deepnorm.transformer import Transformer


def admin_omegas(branch_var_LxS: jnp.ndarray, input_var: jnp.ndarray) -> jnp.ndarray:
    """omega for every sublayer of one stack, [L, S], from its branch variances [L, S]."""
    flat = branch_var_LxS.reshape(-1)
    before = input_var + jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(flat)[:-1]])
    return jnp.sqrt(before).reshape(branch_var_LxS.shape)


def admin_initialize(model: Transformer, inputs, decoder_inputs=None) -> dict[str, jnp.ndarray]:
    """Runs one forward pass on a batch and sets every omega in place; returns them per stack.

    The pass runs with the omegas the model has (1 at initialization), as Admin prescribes.
    """
    if model.config.residual != "admin":
        raise ValueError(
            f"admin_initialize needs residual='admin', not {model.config.residual!r}")
    _, aux = model(inputs, decoder_inputs)
    omegas = {}
    for stack_name, stats in aux.items():
        omega_LxS = admin_omegas(stats["branch_var"], stats["input_var"])
        layers = getattr(model, stack_name).layers
        for s, name in enumerate(layers.sublayer_names):
            param = getattr(layers, f"{name}_omega")
            param.set_value(jnp.broadcast_to(omega_LxS[:, s, None], param[...].shape))
        omegas[stack_name] = omega_LxS
    return omegas
