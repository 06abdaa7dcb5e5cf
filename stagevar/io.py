"""Image files: PNG writing/reading without extra dependencies (see :mod:`stagevar.toy.png`)."""
from __future__ import annotations

from stagevar.toy.png import read_png, write_png


def save_png(path, image_HWC_uint8):
    """Write an (H, W, 3) uint8 array as PNG, atomically."""
    return write_png(path, image_HWC_uint8)


def read_prompt_file(path, max_bytes: int = 10_000_000) -> list[str]:
    """Prompts of a text file, one per line (blank lines and ``#`` comments skipped). Refuses
    missing, binary, non-UTF-8, empty and oversized files with one clear message."""
    from pathlib import Path

    from stagevar.errors import StageVarError
    p = Path(path)
    if not p.is_file():
        raise StageVarError(f"prompts file {p} not found.")
    size = p.stat().st_size
    if size > max_bytes:
        raise StageVarError(f"prompts file {p} is {size / 1e6:.1f} MB; a prompts file is a list of prompts, at most "
                            f"{max_bytes / 1e6:.0f} MB.")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise StageVarError(f"prompts file {p} is not UTF-8 text; expected one prompt per line.") from None
    if "\x00" in text:
        raise StageVarError(f"prompts file {p} contains NUL bytes (a binary file?); expected one prompt per line.")
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise StageVarError(f"prompts file {p} has no prompts (empty, or only comments).")
    return prompts


__all__ = ["save_png", "read_png", "read_prompt_file"]
