"""Huge-page malloc for CPU training: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.

XLA:CPU allocates each step's temporary buffers (the scan's stacked activations, per-layer
gradient buffers) with malloc and frees them after the step. With 4 KiB pages every step then
takes one page fault per 4 KiB it touches: 138,706 minor faults and 220 ms of kernel time per
step of a d=256, 24-layer encoder, against 737 faults and 49 ms with glibc asking the kernel for
transparent huge pages (benchmarks/RESULTS.md, "huge pages"). Accelerator runs allocate little
host memory per step; the setting does them no harm.

glibc reads tunables only when a process starts, so ``train.py`` and the benchmarks re-execute
themselves once with the variable added (``os.execve``: same PID, same arguments).
``DEEPNORM_PLAIN_MALLOC=1`` turns this off; so does a system where the variable is already set.
"""

from __future__ import annotations

import os
import sys

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DEEPNORM_PLAIN_MALLOC"


def hugepages_enabled() -> bool:
    return HUGEPAGE_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def reexec_with_hugepages(extra_env: dict[str, str] | None = None) -> None:
    """Re-executes the running script with huge-page malloc, unless off, on, or not Linux.

    ``extra_env`` entries are added where the environment does not set them already. Call it
    first thing in a script's ``__main__`` (before work that the re-execution would repeat).
    """
    if (not sys.platform.startswith("linux") or hugepages_enabled()
            or os.environ.get(OPT_OUT) == "1"):
        return
    env = dict(os.environ)
    for k, v in (extra_env or {}).items():
        env.setdefault(k, v)
    env["GLIBC_TUNABLES"] = ":".join(
        t for t in (env.get("GLIBC_TUNABLES", ""), HUGEPAGE_TUNABLE) if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def describe() -> str:
    return f"malloc huge pages {'on' if hugepages_enabled() else 'off'}"
