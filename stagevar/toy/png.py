"""Minimal PNG reading and writing with zlib + struct, so the toy pipeline needs no Pillow.

Generated samples and evaluation inputs are small 8-bit RGB images; a dependency on Pillow just
to move them through files would be the only non-core requirement of the toy world. When Pillow
is importable :func:`read_png` still uses it (faster, and it handles every PNG variant); otherwise
the built-in decoder handles non-interlaced 8/16-bit greyscale, RGB, palette, grey+alpha and RGBA
files, which covers what image libraries write by default.
"""
from __future__ import annotations

import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of a uint8 ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array (filter 'Up' rows)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"write_png needs a uint8 array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"write_png needs an (H, W), (H, W, 3) or (H, W, 4) array, got shape {arr.shape}")
    h, w, c = arr.shape
    colour_type = {1: 0, 3: 2, 4: 6}[c]
    rows = np.ascontiguousarray(arr).reshape(h, w * c)
    # Filter type 2 ("Up"): difference to the previous row; cheap to vectorise, compresses well.
    up = rows.copy()
    up[1:] = rows[1:] - rows[:-1]  # uint8 arithmetic wraps modulo 256, as the PNG spec wants
    raw = np.concatenate([np.full((h, 1), 2, dtype=np.uint8), up], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, compress_level)) + _chunk(b"IEND", b"")


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write ``image`` (uint8 HWC) as a PNG atomically: a temp file in the same folder, then
    ``os.replace``, so a reader never sees a half-written file."""
    path = Path(path)
    data = encode_png(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; samples are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _unfilter(data: bytes, h: int, stride: int, bpp: int) -> np.ndarray:
    """Undo PNG row filters. None/Sub/Up are vectorised; Average and Paeth depend on the already
    reconstructed left neighbour and run as a plain loop over the row's bytes."""
    if len(data) < h * (stride + 1):
        raise ValueError(f"PNG image data is truncated ({len(data)} bytes, expected {h * (stride + 1)})")
    buf = np.frombuffer(data, dtype=np.uint8)[: h * (stride + 1)].reshape(h, stride + 1)
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        ftype = int(buf[y, 0])
        line = buf[y, 1:]
        if ftype == 0:
            cur = line.copy()
        elif ftype == 1:
            cur = np.empty(stride, dtype=np.uint8)
            for k in range(bpp):  # each channel is a running sum modulo 256
                cur[k::bpp] = np.cumsum(line[k::bpp], dtype=np.uint8)
        elif ftype == 2:
            cur = line + prev
        elif ftype in (3, 4):
            lb, pb = line.tolist(), prev.tolist()
            cb = [0] * stride
            for i in range(stride):
                a = cb[i - bpp] if i >= bpp else 0
                b = pb[i]
                if ftype == 3:
                    pred = (a + b) >> 1
                else:
                    c = pb[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pbb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if (pa <= pbb and pa <= pc) else (b if pbb <= pc else c)
                cb[i] = (lb[i] + pred) & 0xFF
            cur = np.asarray(cb, dtype=np.uint8)
        else:
            raise ValueError(f"PNG row {y} has unknown filter type {ftype}")
        out[y] = cur
        prev = cur
    return out


def decode_png(data: bytes) -> np.ndarray:
    """Built-in decoder: PNG bytes -> uint8 ``(H, W, 3)`` RGB (alpha dropped, grey expanded)."""
    if not data.startswith(_SIGNATURE):
        raise ValueError("not a PNG file (bad signature)")
    pos = len(_SIGNATURE)
    header = None
    palette = None
    idat = []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG has no IHDR chunk")
    w, h, depth, colour_type, _comp, _filt, interlace = header
    if colour_type not in _CHANNELS:
        raise ValueError(f"PNG colour type {colour_type} is not supported")
    if interlace:
        raise ValueError("interlaced PNGs are not supported by the built-in reader (install Pillow)")
    if depth not in (8, 16) or (colour_type == 3 and depth != 8):
        raise ValueError(f"PNG bit depth {depth} is not supported by the built-in reader (install Pillow)")
    chans = _CHANNELS[colour_type]
    bps = depth // 8
    raw = zlib.decompress(b"".join(idat))
    px = _unfilter(raw, h, w * chans * bps, chans * bps)
    if bps == 2:
        px = px.reshape(h, w * chans, 2)[:, :, 0]  # keep the high byte
    px = px.reshape(h, w, chans)
    if colour_type == 3:
        if palette is None:
            raise ValueError("palette PNG without a PLTE chunk")
        return palette[px[:, :, 0]]
    if chans in (1, 2):
        return np.repeat(px[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(px[:, :, :3])


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG as uint8 ``(H, W, 3)`` RGB, with Pillow when available, else the built-in decoder."""
    try:
        from PIL import Image  # type: ignore[import-not-found]
    except ImportError:
        return decode_png(Path(path).read_bytes())
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
