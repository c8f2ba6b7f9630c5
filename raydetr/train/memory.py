"""Keep freed memory in the process (Linux glibc): no page faults for the step's big tensors.

glibc returns every allocation above its mmap threshold (at most 32 MiB by default) to the
kernel when it is freed, and trims the heap top; a training step allocates and frees the same
large activations (rfdetr-nano, batch 2: tensors of up to 64 MB) every step, so each step pays
~2e5 minor page faults and the kernel's zeroing of those pages again. Measured on the shared
2-core CPU machine (bench/rfdetr_step.py's forward + loss + backward, batch 2, 384 px, 1
thread): 0.41-0.43 s of system time and 210-216 thousand minor faults per step before, 0.00 s
and 0 faults after. The cost: the heap keeps its peak size (which the next step reaches again
anyway). A training process calls this once (the CPU worker does); nothing else changes.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap threshold (to ``mmap_threshold`` bytes, or the 32 MiB glibc allows
    where it refuses more) and stop heap trimming; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    ok = bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    log.debug("glibc: mmap threshold raised, heap trimming off (%s)", ok)
    return ok


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim(0)``); False where
    there is no glibc.

    Mask evaluation frees a few full-size float masks per chunk while the small RLEs it keeps
    are allocated between them: glibc serves such large blocks from the heap once its dynamic
    mmap threshold has risen, and the long-lived RLEs pin the freed space, so the resident set
    grows with every image. Called once per val batch that encoded
    masks, it keeps the evaluation's resident set to what it really holds. In a CPU training
    worker (``keep_freed_memory``) the next step faults its pages in again, once per epoch.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
