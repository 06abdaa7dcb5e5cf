"""Files: the one atomic writer, PNG images (Pillow) and prompt files."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable

import numpy as np


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` so that readers see the old file or the new one, never a partial file: the
    bytes (or UTF-8 text, or whatever ``data(f)`` writes to a binary file) go to a temporary file
    in the same folder, which is synced and then renamed over ``path``. A new file gets the
    permissions the umask allows; a replaced one keeps its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (path.stat().st_mode & 0o777) if path.exists() else (0o666 & ~umask))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 image (or (H, W) grey, (H, W, 4) RGBA) as PNG, atomically."""
    from PIL import Image
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def read_png(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (alpha dropped, grey repeated); ValueError naming the
    file when it is not an image."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file (PNG expected)") from None


def read_prompt_file(path, max_bytes: int = 10_000_000) -> list[str]:
    """Prompts of a text file, one per line (blank lines and ``#`` comments skipped). Refuses
    missing, binary, non-UTF-8, empty and oversized files with one clear message."""
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


__all__ = ["atomic_write", "save_png", "read_png", "read_prompt_file"]
