"""Image files: PNG writing/reading without extra dependencies (see :mod:`stagevar.toy.png`)."""
from __future__ import annotations

from stagevar.toy.png import read_png, write_png


def save_png(path, image_HWC_uint8):
    """Write an (H, W, 3) uint8 array as PNG, atomically."""
    return write_png(path, image_HWC_uint8)


__all__ = ["save_png", "read_png"]
