"""Process settings that make CPU timings repeatable.

On Linux with glibc, large tensors (over the allocator's mmap threshold, which glibc also moves at
run time) get fresh pages from the kernel on every allocation, and freed heap memory is handed
back. A generation then page-faults a varying amount of memory: with infinity-mini at batch 8 on
2 cores the time outside the scales (mostly VAE decoding) moved between 0.11 and 0.23 s depending
on what ran before, and a full generation took 12% longer. :func:`steady_allocator` serves every
allocation from the heap and keeps freed memory (``mallopt(M_MMAP_MAX, 0)``,
``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``), so repeated generations reuse their pages. The
measuring commands (``stagevar-calibrate bench``, ``stagevar-calibrate``) call it; the process then keeps
its peak memory until it exits. ``STAGEVAR_MALLOC=system`` leaves the allocator as it is.
"""
from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_setting: str = "system default"


def steady_allocator() -> str:
    """Apply the steady setting where possible; returns the description of what is in effect."""
    global _setting
    if os.environ.get("STAGEVAR_MALLOC", "").strip().lower() == "system":
        _setting = "system default (STAGEVAR_MALLOC=system)"
        return _setting
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _setting
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return _setting
    if ok:
        _setting = "glibc malloc: no mmap, no trim"
    return _setting


def allocator_setting() -> str:
    """What :func:`steady_allocator` set in this process (recorded next to measured latencies)."""
    return _setting
