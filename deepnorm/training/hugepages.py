"""Huge-page malloc for CPU training: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, opt-in.

XLA:CPU allocates each step's temporary buffers (the scan's stacked activations, per-layer
gradient buffers) with malloc and frees them after the step. With 4 KiB pages every step then
takes one page fault per 4 KiB it touches: 138,706 minor faults and 220 ms of kernel time per
step of a d=256, 24-layer encoder, against 737 faults and 49 ms with glibc asking the kernel for
transparent huge pages (docs/performance.md, "Process settings on CPU"). Accelerator runs allocate little
host memory per step; the setting does them no harm.

glibc reads tunables only when a process starts. Two ways to get them:

- ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py ...``: no re-execution at all.
- ``DEEPNORM_HUGEPAGES=1 python train.py ...``: the script re-executes itself once with the
  variable added (``os.execve``: same PID, same arguments).

``train.py`` does not re-execute unless asked: a debugger, ``srun`` or an IDE then sees the
process it started. An environment variable rather than a flag because the choice is made
before any flag parsing (absl or argparse), it must survive the re-execution, and the
benchmarks share it: they re-execute by default (their figures are with huge pages on; each
prints the malloc state in its header) and ``DEEPNORM_HUGEPAGES=0`` turns that off.
"""

from __future__ import annotations

import os
import sys

from deepnorm.config import ConfigError

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "DEEPNORM_HUGEPAGES"


def hugepages_enabled() -> bool:
    return HUGEPAGE_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def reexec_requested(by_default: bool) -> bool:
    """Whether ``DEEPNORM_HUGEPAGES`` asks for the re-execution (unset: ``by_default``)."""
    value = os.environ.get(SWITCH, "")
    if value == "":
        return by_default
    if value not in ("0", "1"):
        raise ConfigError(f"{SWITCH}={value!r} is not one of 0 (plain malloc), 1 (re-execute "
                          "with huge-page malloc)")
    return value == "1"


def reexec_with_hugepages(extra_env: dict[str, str] | None = None, *,
                          by_default: bool = False) -> None:
    """Re-executes the running script with huge-page malloc if ``DEEPNORM_HUGEPAGES=1`` (or it
    is unset and ``by_default``), unless the tunable is already on or this is not Linux.

    ``extra_env`` entries are added where the environment does not set them already. Call it
    first thing in a script's ``__main__`` (before work that the re-execution would repeat).
    """
    if (not reexec_requested(by_default) or not sys.platform.startswith("linux")
            or hugepages_enabled()):
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
