"""Convergence curves (StageVAR Fig. 1): how close the partial image after each scale is to the
final image. Also collects the per-scale hidden states whose spectra are analysed in
:mod:`calibrate.measure.spectra` (same generation pass)."""
from __future__ import annotations

import numpy as np
import torch

from calibrate.measure.sensitivity import standard_error
from calibrate.metrics import SemanticScorer, ssim


def coarse_agreement(a: np.ndarray, b: np.ndarray, size: int = 8) -> np.ndarray:
    """Weight-free semantic proxy for partial images: correlation of 8x8 average-pooled colour
    images (layout and colour of the content, not detail), mapped to [0, 1]."""
    t = lambda x: torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(x)).float(), size).flatten(1).numpy()  # noqa: E731
    pa, pb = t(a), t(b)
    pa = pa - pa.mean(1, keepdims=True)
    pb = pb - pb.mean(1, keepdims=True)
    den = np.sqrt((pa ** 2).sum(1) * (pb ** 2).sum(1))
    corr = np.where(den > 1e-12, (pa * pb).sum(1) / np.maximum(den, 1e-12), 1.0)
    return (corr + 1) / 2


def collect_partials(subject, spectra_layers=(), keep_spectra: bool = True):
    """One identity pass recording, per scale, the decoded partial images (list of batches) and,
    if asked, the conditional rows' hidden states at ``spectra_layers``. Returns
    (partial, feats, run output)."""
    adapter = subject.adapter
    partial: list[list[np.ndarray]] = [[] for _ in range(subject.num_scales)]
    feats: dict[tuple[int, int], list[np.ndarray]] = {}

    def obs(o, offset):
        partial[o.scale].append(adapter.decode(o.state).float().cpu().numpy())
        if keep_spectra:
            B = o.state.batch_size
            for layer, h in o.hidden.items():
                feats.setdefault((o.scale, layer), []).append(h[:B].float().cpu().numpy())

    out = subject.run(None, observer=obs, observe_layers=spectra_layers)
    return partial, feats, out


def convergence_values(partial, final: np.ndarray, prompts: list[str], scorer: SemanticScorer) -> dict:
    """Per-image values of the convergence curves: for each scale, ``ssim`` (float64) and
    ``semantic`` (:func:`coarse_agreement`, float32) of the partial images against ``final``; with
    the embedded model's evaluator also ``evaluator`` (pass = 1.0, per scale) and
    ``final_semantic`` (the final images)."""
    vals: dict = {"ssim": [], "semantic": []}
    evaluator = scorer.judges_prompt
    if evaluator:
        vals["final_semantic"] = np.asarray(scorer.score(final, prompts, final), dtype=np.float64)
        vals["evaluator"] = []
    for batches in partial:
        imgs = np.concatenate(batches)
        vals["ssim"].append(ssim(imgs, final))
        vals["semantic"].append(coarse_agreement(imgs, final).astype(np.float32))
        if evaluator:
            vals["evaluator"].append(np.asarray(scorer.score(imgs, prompts, final), dtype=np.float64))
    return vals


#: dtype each per-image curve value is reduced in (that of :func:`convergence_values`)
CURVE_DTYPES = {"ssim": np.float64, "semantic": np.float32, "evaluator": np.float64}


def summarize_curves(values: dict) -> dict:
    """The one reduction of per-image curve values (:func:`convergence_values`, or their
    concatenation over shards) to the record's curves: per scale the mean and its standard error
    (``<name>_se``) over the images."""
    n = len(values["ssim"])
    curves: dict = {"scale": list(range(n)), "semantic_measure": "coarse_agreement"}
    for name, dtype in CURVE_DTYPES.items():
        if name in values:
            arrays = [np.asarray(v, dtype=dtype) for v in values[name]]
            curves[name] = [float(a.mean()) for a in arrays]
            curves[f"{name}_se"] = [standard_error(a) for a in arrays]
    if "final_semantic" in values:
        curves["final_semantic"] = float(np.asarray(values["final_semantic"], dtype=np.float64).mean())
    return curves


def measure_convergence(subject, scorer: SemanticScorer, spectra_layers=(), keep_spectra: bool = True):
    """One identity pass. Returns (curves dict, hidden features per (scale, layer) for spectra).

    ``semantic`` (the curve stages are detected on) is :func:`coarse_agreement` for every model:
    it asks whether the layout and colours of the content are already those of the final image,
    which a blurry partial image can show. With the embedded model's evaluator, ``evaluator`` is
    also recorded: the share of partial images that pass their prompt (``final_semantic`` for the
    final image). It is reported, not used for the boundaries, because a coarse partial image
    fails a shape test for lack of resolution even when its content is decided."""
    partial, feats, out = collect_partials(subject, spectra_layers, keep_spectra)
    curves = summarize_curves(convergence_values(partial, out.images, subject.item_prompts, scorer))
    return curves, {k: np.concatenate(v) for k, v in feats.items()}, out
