"""Process settings that the benchmarks apply on Linux before JAX starts (documented in RESULTS.md).

``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` makes glibc's malloc ask the kernel for transparent
huge pages (madvise) on the memory it maps. XLA:CPU allocates each step's temporary buffers
(stacked activations, per-layer gradient buffers) with malloc and frees them after the step;
with 4 KiB pages every step then takes one page fault per 4 KiB it touches. Measured on the
2-core machine (RESULTS.md, "huge pages"): 138,706 minor faults and 220 ms of kernel time per
step of a d=256, 24-layer encoder before, 737 faults and 49 ms after.

glibc reads tunables only when a process starts, so a script that wants them re-executes
itself once with the variable set. ``DEEPNORM_BENCH_PLAIN_MALLOC=1`` turns this off (to measure
the difference); so does running on a system where the variable is already set.
"""

from __future__ import annotations

import os
import sys

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepages_enabled() -> bool:
    return HUGEPAGE_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def reexec_with_hugepages(extra_env: dict[str, str] | None = None) -> None:
    """Re-executes the running script with huge-page malloc, unless off or already on.

    ``extra_env`` entries are added where the environment does not set them already.
    """
    if (not sys.platform.startswith("linux") or hugepages_enabled()
            or os.environ.get("DEEPNORM_BENCH_PLAIN_MALLOC") == "1"):
        return
    env = dict(os.environ)
    for k, v in (extra_env or {}).items():
        env.setdefault(k, v)
    env["GLIBC_TUNABLES"] = ":".join(
        t for t in (env.get("GLIBC_TUNABLES", ""), HUGEPAGE_TUNABLE) if t)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def describe() -> str:
    return f"malloc huge pages {'on' if hugepages_enabled() else 'off'}"
