"""Convergence curves (StageVAR Fig. 1): how close the partial image after each scale is to the
final image. Also collects the per-scale hidden states whose spectra are analysed in
:mod:`calibrate.measure.spectra` (same generation pass)."""
from __future__ import annotations

import numpy as np
import torch

from calibrate.measure.sensitivity import standard_error
from calibrate.metrics import SemanticScorer, luma, ssim


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


#: radial frequency bands (cycles per pixel; Nyquist is 0.5) of :func:`band_energy`
BANDS = {"low": (0.0, 0.125), "mid": (0.125, 0.25), "high": (0.25, 1.0)}


def band_energy(delta: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, the spectral energy (luma) of ``delta`` (what a scale changed) in each band of
    :data:`BANDS`, relative to the energy of ``reference`` (the final image, mean removed).

    >>> x = np.zeros((1, 3, 16, 16)); x[..., ::2] = 1.0            # stripes at Nyquist: all high
    >>> {k: round(float(v[0]), 3) for k, v in band_energy(x, x).items()}
    {'low': 0.0, 'mid': 0.0, 'high': 1.0}
    """
    d, r = luma(np.asarray(delta, dtype=np.float64)), luma(np.asarray(reference, dtype=np.float64))
    h, w = d.shape[-2:]
    radius = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2)
    masks = {name: (radius >= lo) & (radius < hi) & (radius > 0) for name, (lo, hi) in BANDS.items()}   # DC in none
    out: dict[str, list[float]] = {name: [] for name in BANDS}
    for dz, rz in zip(d, r):            # image by image: the sums do not depend on how images were batched
        p = np.abs(np.fft.fft2(dz)) ** 2
        total = max(float((np.abs(np.fft.fft2(rz - rz.mean())) ** 2).sum()), 1e-12)
        for name, mask in masks.items():
            out[name].append(float(p[mask].sum()) / total)
    return {name: np.array(v) for name, v in out.items()}


def convergence_values(partial, final: np.ndarray, prompts: list[str], scorer: SemanticScorer) -> dict:
    """Per-image values of the convergence curves: for each scale, ``ssim`` (float64) and
    ``semantic`` (:func:`coarse_agreement`, float32) of the partial images against ``final``, and
    ``band_<low|mid|high>`` (:func:`band_energy` of what the scale changed); with the embedded
    model's evaluator also ``evaluator`` (pass = 1.0, per scale) and ``final_semantic`` (the final
    images); with learned metrics their agreement with ``final`` (``semantic:clip``, ...)."""
    vals: dict = {"ssim": [], "semantic": [], **{f"band_{b}": [] for b in BANDS}}
    evaluator = scorer.judges_prompt
    if evaluator:
        vals["final_semantic"] = np.asarray(scorer.score(final, prompts, final), dtype=np.float64)
        vals["evaluator"] = []
    previous = None
    for batches in partial:
        imgs = np.concatenate(batches)
        vals["ssim"].append(ssim(imgs, final))
        vals["semantic"].append(coarse_agreement(imgs, final).astype(np.float32))
        for b, v in band_energy(imgs if previous is None else imgs - previous, final).items():
            vals[f"band_{b}"].append(v)
        previous = imgs
        if evaluator:
            vals["evaluator"].append(np.asarray(scorer.score(imgs, prompts, final), dtype=np.float64))
        for k, v in scorer.metric_values(imgs, final).items():
            vals.setdefault(k, []).append(v)
    return vals


#: dtype each per-image curve value is reduced in (that of :func:`convergence_values`; float64
#: for the others)
CURVE_DTYPES = {"ssim": np.float64, "semantic": np.float32, "evaluator": np.float64}


def curve_names(values: dict) -> list[str]:
    """The per-scale value names in ``values`` (per-image values or a shard's stored items)."""
    return [k for k in values if k in CURVE_DTYPES or k.startswith("band_") or ":" in k]


def summarize_curves(values: dict, prompts: int | None = None) -> dict:
    """The one reduction of per-image curve values (:func:`convergence_values`, or their
    concatenation over shards) to the record's curves: per scale the mean and its standard error
    (``<name>_se``) over the images.

    ``semantic`` and ``ssim`` are the curves the stage rule reads. When learned semantic metrics
    were measured, ``semantic`` is their per-image mean (the coarse colour-layout agreement is
    kept as ``coarse_agreement``); when structural ones were, ``structure`` is the per-image mean
    of SSIM and them. ``semantic_measure`` / ``structure_measure`` name what each is. ``images``
    holds the per-image values of those two curves (per scale, one value an image) and, given,
    the number of ``prompts`` the images are drawn from (in the passes' seed-major order, image i
    shows prompt i mod ``prompts``), so that a resampling can keep a prompt's seeds together."""
    n = len(values["ssim"])
    curves: dict = {"scale": list(range(n)), "semantic_measure": "coarse_agreement"}
    arrays = {name: [np.asarray(v, dtype=CURVE_DTYPES.get(name, np.float64)) for v in values[name]]
              for name in curve_names(values)}

    def put(name, per_scale):
        curves[name] = [float(a.mean()) for a in per_scale]
        curves[f"{name}_se"] = [standard_error(a) for a in per_scale]

    for name, per_scale in arrays.items():
        put(name, per_scale)
    learned_sem = sorted(k for k in arrays if k.startswith("semantic:"))
    learned_str = sorted(k for k in arrays if k.startswith("structure:"))
    # the per-image values of the two curves the stage rule reads (kept in the record, so that the
    # boundaries can be resampled: :func:`calibrate.measure.stages.boundary_support`)
    semantic = [np.mean([arrays[k][i] for k in learned_sem], axis=0) for i in range(n)] if learned_sem else arrays["semantic"]
    structure = ([np.mean([arrays["ssim"][i]] + [arrays[k][i] for k in learned_str], axis=0) for i in range(n)]
                 if learned_str else arrays["ssim"])
    if learned_sem:
        curves["coarse_agreement"], curves["coarse_agreement_se"] = curves["semantic"], curves["semantic_se"]
        put("semantic", semantic)
        curves["semantic_measure"] = "+".join(k.split(":", 1)[1] for k in learned_sem)
    if learned_str:
        put("structure", structure)
        curves["structure_measure"] = "+".join(["ssim"] + [k.split(":", 1)[1] for k in learned_str])
    if "final_semantic" in values:
        curves["final_semantic"] = float(np.asarray(values["final_semantic"], dtype=np.float64).mean())
    curves["images"] = {"semantic": [[round(float(v), 6) for v in a] for a in semantic],
                        "structure": [[round(float(v), 6) for v in a] for a in structure]}
    if prompts is not None:
        curves["images"]["prompts"] = prompts
    return curves


def join_values(values: dict, more: dict) -> dict:
    """Per-image values of :func:`convergence_values` of two sets of images, as one set (``values``'
    images first)."""
    out = {}
    for name, v in values.items():
        if isinstance(v, np.ndarray):                       # one value an image (final_semantic)
            out[name] = np.concatenate([v, more[name]])
        else:                                               # per scale, one array of images
            out[name] = [np.concatenate([a, b]) for a, b in zip(v, more[name])]
    return out


def convergence_pass(subject, scorer: SemanticScorer, spectra_layers=(), keep_spectra: bool = True, more=None):
    """One identity pass over ``subject`` (the reference) and, when given, one over ``more`` (other
    seeds of the same prompts, only for the curves). Returns (per-image values of
    :func:`convergence_values`, hidden features of ``subject``'s images per (scale, layer) for the
    spectra, ``subject``'s run output)."""
    partial, feats, out = collect_partials(subject, spectra_layers, keep_spectra)
    values = convergence_values(partial, out.images, subject.item_prompts, scorer)
    if more is not None:
        more_partial, _, more_out = collect_partials(more, (), keep_spectra=False)
        values = join_values(values, convergence_values(more_partial, more_out.images, more.item_prompts, scorer))
    return values, feats, out


def measure_convergence(subject, scorer: SemanticScorer, spectra_layers=(), keep_spectra: bool = True, more=None):
    """One identity pass (and one over ``more``, other seeds of the same prompts, whose images
    join the curves only: :func:`convergence_pass`). Returns (curves dict, hidden features per
    (scale, layer) for spectra, ``subject``'s run output: the reference of the sensitivity pass).

    ``semantic`` (the curve stages are detected on) is :func:`coarse_agreement` for every model:
    it asks whether the layout and colours of the content are already those of the final image,
    which a blurry partial image can show. With the embedded model's evaluator, ``evaluator`` is
    also recorded: the share of partial images that pass their prompt (``final_semantic`` for the
    final image). It is reported, not used for the boundaries, because a coarse partial image
    fails a shape test for lack of resolution even when its content is decided."""
    values, feats, out = convergence_pass(subject, scorer, spectra_layers, keep_spectra, more)
    return summarize_curves(values, len(subject.prompts)), {k: np.concatenate(v) for k, v in feats.items()}, out
