"""Similarity between an accelerated image and the full model's image of the same seed.

* structural: SSIM (Wang et al. 2004; Gaussian window sigma 1.5, on luma) and the
  high-frequency energy ratio (energy of the image spectrum above half the Nyquist radius,
  accelerated / full: < 1 means lost detail, > 1 means added noise);
* semantic: a pluggable :class:`SemanticScorer`, the one the model's registry entry names
  (:data:`SCORERS`). For the embedded model the analytic evaluator says whether the image still
  satisfies its prompt; the other models use, for now, the weight-free agreement of the model's
  own final codes (the tokens / bits it sampled at the last computed scale) with the full
  model's.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def _luma(img: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) or (3, H, W) float in [0, 1] -> luma in [0, 1]."""
    return 0.299 * img[..., 0, :, :] + 0.587 * img[..., 1, :, :] + 0.114 * img[..., 2, :, :]


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM of two batches (N, 3, H, W) in [0, 1] (computed on luma).

    >>> x = np.random.default_rng(0).random((1, 3, 16, 16))
    >>> float(ssim(x, x)[0])
    1.0
    """
    a = _luma(np.asarray(a, dtype=np.float64))
    b = _luma(np.asarray(b, dtype=np.float64))
    if a.ndim == 2:
        a, b = a[None], b[None]
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for x, y in zip(a, b):
        f = lambda z: ndimage.gaussian_filter(z, sigma, mode="reflect", truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        out.append(float(m.mean()))
    return np.array(out)


def high_frequency_energy(img: np.ndarray, cutoff: float = 0.5) -> np.ndarray:
    """Per image: share of spectral energy (luma, mean removed) above ``cutoff`` x Nyquist."""
    y = _luma(np.asarray(img, dtype=np.float64))
    if y.ndim == 2:
        y = y[None]
    n, h, w = y.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    high = np.sqrt(fy ** 2 + fx ** 2) > cutoff * 0.5
    out = []
    for z in y:
        p = np.abs(np.fft.fft2(z - z.mean())) ** 2
        tot = p.sum()
        out.append(float(p[high].sum() / tot) if tot > 0 else 0.0)
    return np.array(out)


def hf_ratio(acc: np.ndarray, full: np.ndarray) -> np.ndarray:
    """High-frequency energy of the accelerated image relative to the full model's (1 = same)."""
    a, f = high_frequency_energy(acc), high_frequency_energy(full)
    return np.where(f > 1e-12, a / np.maximum(f, 1e-12), 1.0)


class SemanticScorer:
    """Interface: per-image semantic agreement in [0, 1] between accelerated and full outputs.

    ``judges_prompt``: the scorer gives each image a verdict against its own prompt (``score``
    ignores the reference images), so the full model's images have verdicts too
    (:meth:`reference_verdicts`) and agreement means the same verdict. Otherwise ``score`` is
    itself the agreement of each image with its reference."""

    name = "semantic"
    judges_prompt = False

    def reference_verdicts(self, images: np.ndarray, prompts: list[str]) -> np.ndarray | None:
        """The verdicts on the full model's images (None for a scorer that does not judge prompts)."""
        return self.score(images, prompts, images) if self.judges_prompt else None

    def score(self, images: np.ndarray, prompts: list[str], reference_images: np.ndarray,
              codes: list | None = None, reference_codes: list | None = None) -> np.ndarray:
        raise NotImplementedError


class ToyEvaluatorScorer(SemanticScorer):
    """The embedded model's analytic evaluator: 1 if the image satisfies its prompt, else 0."""

    name = "evaluator"
    judges_prompt = True

    def score(self, images, prompts, reference_images, codes=None, reference_codes=None):
        from stagevar.toy.evaluate import score as eval_score
        from stagevar.toy.prompts import parse_prompt
        u8 = (np.clip(images, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
        return np.array([float(eval_score(im, parse_prompt(p))) for im, p in zip(u8, prompts)])


class CodeAgreementScorer(SemanticScorer):
    """Weight-free fallback: fraction of the final computed scale's codes (tokens or bits) equal
    to the full model's. Codes are compared per image."""

    name = "codes"

    def score(self, images, prompts, reference_images, codes=None, reference_codes=None):
        if codes is None or reference_codes is None:
            return np.ones(len(images))
        a, b = codes, reference_codes
        if a.shape != b.shape:
            return np.zeros(len(images))
        eq = (a.reshape(a.shape[0], -1) == b.reshape(b.shape[0], -1)).astype(np.float64)
        return eq.mean(axis=1)


#: scorers by the name a model's registry entry gives (``register_model(scorer=...)``)
SCORERS = {"evaluator": ToyEvaluatorScorer, "codes": CodeAgreementScorer}


def scorer_for(model_name: str) -> SemanticScorer:
    """The scorer the model's registry entry names (the evaluator for models of the procedural
    scenes, the code agreement where no better one is known)."""
    from stagevar.models.registry import model_entry
    name = model_entry(model_name).scorer
    if name not in SCORERS:
        raise ValueError(f"model {model_name!r} names the scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]()
