"""The calibration record: the only contract between measurement and search.

A record is a directory ``<out>/calibration-<key>/`` holding ``record.json`` (versioned, all the
tables) and ``spectra.npz`` (the normalised singular-value spectra). ``key`` is a content hash of
everything the measurement depends on (model fingerprint, prompts, seeds, device, dtype, batch
size, settings, measurement code version), so the same inputs reuse the same record (cache hit)
and different inputs never collide.

Measurement is split into *units* (one convergence pass, one sensitivity variant, one latency
round ...). Each finished unit is written atomically to ``units/<name>.json``; an interrupted run
resumes by skipping finished units. ``record.json`` appears only when every unit is done.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from stagevar.errors import StageVarError
from stagevar.io import atomic_write

RECORD_VERSION = 1
MEASURE_CODE_VERSION = 3


class RecordError(StageVarError):
    pass


def content_key(inputs: dict[str, Any]) -> str:
    blob = json.dumps({"inputs": inputs, "code": MEASURE_CODE_VERSION}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_json(path: str | os.PathLike, name: str, error: type[Exception], missing: str, invalid: str) -> tuple[Path, Any]:
    """``(file, parsed JSON)`` of ``path`` (a file, or a directory holding ``name``); a missing
    file raises ``error`` with ``missing``, unreadable JSON with ``invalid`` (``{exc}``: the
    parser's message), each after the file's path."""
    p = Path(path)
    f = p / name if p.is_dir() else p
    if not f.is_file():
        raise error(f"{f}: {missing}")
    try:
        return f, json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{f}: " + invalid.format(exc=exc)) from None


@dataclasses.dataclass
class CalibrationRecord:
    key: str
    inputs: dict[str, Any]                      # what the key hashes: model, prompts, seeds, device, settings
    convergence: dict[str, Any]
    sensitivity: list[dict[str, Any]]           # rows: scale, variant, guidance, keep, selection, ssim, semantic, hf_ratio, quality
    spectra: list[dict[str, Any]]               # rows: scale, layer, tokens, eff_rank_90/95/99
    latency: dict[str, Any]                     # device info, overhead_s, rows: scale, variant, seconds, p90
    latency_check: list[dict[str, Any]]         # rows: policy, predicted_s, measured_s, error
    stages: dict[str, Any]                      # semantic/structure/refinement [a, b], rule, evidence
    version: int = RECORD_VERSION
    spectra_arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_scales(self) -> int:
        return len(self.inputs["model"]["scale_schedule"])

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("spectra_arrays")
        return d

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.spectra_arrays:
            atomic_write(directory / "spectra.npz", lambda f: np.savez(f, **self.spectra_arrays))
        atomic_write(directory / "record.json", json.dumps(self.to_json(), indent=1, default=_np_default))
        return directory / "record.json"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationRecord":
        f, d = read_json(path, "record.json", RecordError, "no calibration record here. Run `stagevar-calibrate measure` first.",
                         "not a valid calibration record ({exc}). Delete it and measure again.")
        if not isinstance(d, dict):
            raise RecordError(f"{f}: not a calibration record (top level is {type(d).__name__}). Delete it and measure again.")
        v = d.get("version")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RecordError(f"{f}: field 'version' is {v!r}, not a valid record version. Delete it and measure again.")
        if v > RECORD_VERSION:
            raise RecordError(f"{f}: record version {v} is newer than this stagevar understands ({RECORD_VERSION}); upgrade stagevar.")
        if v < RECORD_VERSION:
            if any(step not in MIGRATIONS for step in range(v, RECORD_VERSION)):
                raise RecordError(f"{f}: no migration from record version {v}; measure again.")
            d = migrate(d, v)
        fields = dataclasses.fields(cls)
        names = {x.name for x in fields}
        unknown = set(d) - names
        if unknown:
            raise RecordError(f"{f}: unknown fields {sorted(unknown)} in the calibration record.")
        required = {x.name for x in fields if x.default is dataclasses.MISSING and x.default_factory is dataclasses.MISSING}
        missing = required - set(d)
        if missing:
            raise RecordError(f"{f}: the calibration record lacks fields {sorted(missing)}; it is incomplete. Measure again.")
        rec = cls(**d)
        npz = f.parent / "spectra.npz"
        if npz.is_file():
            with np.load(npz) as z:
                rec.spectra_arrays = {k: z[k] for k in z.files}
        return rec

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True, default=_np_default).encode()).hexdigest()


MIGRATIONS: dict[int, Any] = {}


def migrate(d: dict[str, Any], version: int) -> dict[str, Any]:
    while version < RECORD_VERSION:
        d = MIGRATIONS[version](d)
        version += 1
    d["version"] = RECORD_VERSION
    return d


def _np_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


class UnitStore:
    """Finished measurement units, one JSON file each, written atomically (resume support)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory) / "units"
        self.dir.mkdir(parents=True, exist_ok=True)
        for d in (self.dir, self.dir.parent):   # temp files of writes killed before their rename
            for tmp in d.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def _path(self, name: str) -> Path:
        return self.dir / (name.replace("/", "__") + ".json")

    def get(self, name: str) -> Any | None:
        p = self._path(name)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            p.unlink(missing_ok=True)       # a torn file cannot happen with atomic writes; be safe anyway
            return None

    def put(self, name: str, value: Any) -> Any:
        atomic_write(self._path(name), json.dumps(value, default=_np_default))
        return value

    def done(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json"))
