"""Process settings the benchmarks apply before JAX starts: huge-page malloc, the same as
train.py (``deepnorm.training.hugepages``; ``DEEPNORM_PLAIN_MALLOC=1`` turns it off)."""

from deepnorm.training.hugepages import describe, hugepages_enabled, reexec_with_hugepages  # noqa: F401
