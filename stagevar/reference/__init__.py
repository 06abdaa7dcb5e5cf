"""Checking an implementation against tensors dumped from upstream code.

A reference directory holds ``infinity/golden/`` and/or ``var/golden/``, each described by its
``golden_meta.json`` (see ``shared/reference/README.md`` for the format). :func:`check_directory`
runs every family found there and returns one :class:`CheckRow` per compared tensor, in the
recommended order: teacher-forced logits -> forced-token inference logits -> free-running greedy
tokens -> latent -> image; then the same greedy generation through the runtime on an engine
(:func:`runtime_rows`: every scale's codes and the image), so the path users run is checked too.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


@dataclasses.dataclass
class CheckRow:
    family: str          # "infinity" | "var"
    stage: str           # "teacher-forced", "forced-inference cfg=3.0", "greedy cfg=3.0", "image cfg=3.0", ...
    tensor: str          # name of the recorded tensor
    max_abs: float       # max |ours - ref| (for discrete tensors: number of mismatches)
    max_rel: float       # max_abs / max |ref|
    tolerance: float     # allowed max_abs
    passed: bool
    note: str = ""


def compare(family: str, stage: str, name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float, note: str = "") -> CheckRow:
    """Float comparison row. Shapes must match (a mismatch is a failed row, not an exception)."""
    ours = ours.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if ours.shape != ref.shape:
        return CheckRow(family, stage, name, float("inf"), float("inf"), tol, False,
                        f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    err = (ours - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    rel = err / scale if scale > 0 else err
    return CheckRow(family, stage, name, err, rel, tol, bool(err <= tol), note)


def compare_exact(family: str, stage: str, name: str, ours: torch.Tensor, ref: torch.Tensor, note: str = "") -> CheckRow:
    """Discrete comparison row: ``max_abs`` holds the number of differing elements."""
    ours = ours.detach().cpu().long()
    ref = ref.detach().cpu().long()
    if ours.shape != ref.shape:
        return CheckRow(family, stage, name, float("inf"), float("inf"), 0.0, False,
                        f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    n = int((ours != ref).sum().item())
    return CheckRow(family, stage, name, float(n), n / max(1, ref.numel()), 0.0, n == 0, note or "mismatching elements")


def runtime_rows(family: str, stage: str, model, condition, guidance, seed: int, engine: str | None,
                 ref_codes: list[torch.Tensor], ref_image: torch.Tensor | None, image_tol: float,
                 image_of=lambda img: img, **sampling) -> list[CheckRow]:
    """The greedy generation of ``stage`` through :class:`~stagevar.runtime.Runtime` on ``engine``
    (identity policy): every scale's codes exactly, and the image (``image_of`` maps the runtime's
    [0, 1] image to the reference's convention) within ``image_tol``."""
    from stagevar.runtime import Runtime
    codes: list[torch.Tensor] = []
    rt = Runtime(model, engine=engine)
    res = rt.generate(condition=condition, guidance=guidance, seed=seed,
                      observer=lambda o: codes.append(o.codes.detach().clone()), **sampling)
    label = f"runtime {res.engine} {stage}"
    ours = torch.cat([c.reshape(c.shape[0], -1) for c in codes], 1)
    want = torch.cat([c.reshape(c.shape[0], -1) for c in ref_codes], 1)
    rows = [compare_exact(family, label, "codes (all scales)", ours, want)]
    if ref_image is not None:
        rows.append(compare(family, label, "image", image_of(res.images), ref_image, image_tol))
    return rows


def check_directory(root: str | Path, family: str | None = None, engine: str | None = None) -> list[CheckRow]:
    """Run every family present under ``root`` (``infinity/golden``, ``var/golden``), or only
    ``family``; the runtime rows run on ``engine`` (None: the device's default)."""
    root = Path(root)
    rows: list[CheckRow] = []
    found = False
    if family in (None, "infinity") and (root / "infinity" / "golden" / "golden_meta.json").is_file():
        from stagevar.reference.infinity import check_infinity_golden
        rows += check_infinity_golden(root / "infinity" / "golden", engine=engine)
        found = True
    if family in (None, "var") and (root / "var" / "golden" / "golden_meta.json").is_file():
        from stagevar.reference.var import check_var_golden
        rows += check_var_golden(root / "var" / "golden", engine=engine)
        found = True
    if not found:
        from stagevar.errors import StageVarError
        raise StageVarError(
            f"{root} is not a reference directory: neither {root}/infinity/golden/golden_meta.json nor "
            f"{root}/var/golden/golden_meta.json exists{' for family ' + family if family else ''}. "
            "Point at the folder that holds infinity/ and var/."
        )
    return rows
