"""Similarity between an accelerated image and the full model's image of the same seed.

* structural: SSIM (Wang et al. 2004; Gaussian window sigma 1.5, on luma) and the
  high-frequency energy ratio (energy of the image spectrum above half the Nyquist radius,
  accelerated / full: < 1 means lost detail, > 1 means added noise);
* semantic: a pluggable :class:`SemanticScorer`, the one the model's registry entry names
  (:data:`SCORERS`). For the embedded model the analytic evaluator says whether the image still
  satisfies its prompt; the other models fall back to the weight-free agreement of the model's
  own final codes (the tokens / bits it sampled at the last computed scale) with the full
  model's, which is not a semantic measure;
* learned metrics (:mod:`calibrate.perceptual`): CLIP and DINOv2 image agreement (semantic) and
  LPIPS (structure), chosen with ``--metric`` and attached to the scorer
  (:func:`build_scorer`). When a learned semantic metric is attached, it replaces the code
  agreement in the quality; SSIM is always measured and LPIPS joins it as structure.

quality = 0.5 * structure + 0.5 * semantic, per image, where structure is the mean of SSIM and
the structural metrics and semantic the mean of the semantic ones (see
:func:`calibrate.measure.sensitivity.summarize`).
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from scipy import ndimage

from stagevar.errors import StageVarError

log = logging.getLogger(__name__)


def luma(img: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) or (3, H, W) float in [0, 1] -> luma in [0, 1]."""
    return 0.299 * img[..., 0, :, :] + 0.587 * img[..., 1, :, :] + 0.114 * img[..., 2, :, :]


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM of two batches (N, 3, H, W) in [0, 1] (computed on luma).

    >>> x = np.random.default_rng(0).random((1, 3, 16, 16))
    >>> float(ssim(x, x)[0])
    1.0
    """
    a = luma(np.asarray(a, dtype=np.float64))
    b = luma(np.asarray(b, dtype=np.float64))
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
    y = luma(np.asarray(img, dtype=np.float64))
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
    #: learned metrics measured beside the scorer (:mod:`calibrate.perceptual`), set by :func:`build_scorer`
    metrics: tuple = ()

    @property
    def semantic_metrics(self) -> list:
        return [m for m in self.metrics if m.kind == "semantic"]

    @property
    def has_semantic_measure(self) -> bool:
        """Whether the quality reads a semantic measure (the evaluator, CLIP, DINO), not only codes + SSIM."""
        return self.judges_prompt or bool(self.semantic_metrics)

    def describe(self) -> dict:
        """What the quality is made of, for the record, the report and the policy's provenance."""
        semantic = [m.name for m in self.semantic_metrics]
        if self.judges_prompt or not semantic:
            semantic.insert(0, self.name)
        return {"semantic": semantic, "structure": ["ssim"] + [m.name for m in self.metrics if m.kind == "structure"],
                "sources": {m.name: m.source for m in self.metrics},
                "semantic_measure": self.has_semantic_measure}

    def metric_values(self, images: np.ndarray, reference_images: np.ndarray, prompts: list[str] | None = None) -> dict:
        """Per-image values of the learned metrics: ``semantic:<name>`` / ``structure:<name>``
        agreements with the references, and ``prompt:<name>`` image-prompt scores when ``prompts``
        is given and the metric has one."""
        vals = {}
        for m in self.metrics:
            t0 = time.perf_counter()
            agreement, prompt_score = m.measure(images, reference_images, prompts)
            vals[f"{m.kind}:{m.name}"] = np.asarray(agreement, dtype=np.float64)
            if prompt_score is not None:
                vals[f"prompt:{m.name}"] = np.asarray(prompt_score, dtype=np.float64)
            m.seconds += time.perf_counter() - t0
            m.images += len(images)
        return vals

    def metric_cost(self) -> dict[str, dict[str, float]]:
        """Seconds spent in each learned metric, and images scored, since the scorer was built."""
        return {m.name: {"seconds": round(m.seconds, 2), "images": m.images} for m in self.metrics}

    def cost_text(self) -> str:
        """The learned metrics' time so far, for a progress bar ("" without learned metrics)."""
        total = sum(m.seconds for m in self.metrics)
        return f"metrics {total:.0f}s" if self.metrics else ""

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
#: every name ``--metric`` takes: the scorers, SSIM (always measured) and the learned metrics
METRICS = ("evaluator", "codes", "ssim", "clip", "dino", "lpips", "dists")
#: learned metrics tried from the local caches when a model's own scorer is the code agreement
DEFAULT_LEARNED = ("clip", "dino", "lpips")


def parse_metric_list(text: str) -> list[str]:
    """``--metric`` value: comma-separated names from :data:`METRICS` (argparse type; a bad
    name is a usage error naming the available ones)."""
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown metric {', '.join(map(repr, bad)) or repr(text)}; available: "
                                         f"{', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def parse_metric_weights(text: str) -> dict[str, str]:
    """``--metric-weights`` value: ``NAME=DIR[,NAME=DIR]`` for the learned metrics."""
    from calibrate.perceptual import LEARNED
    out = {}
    for part in (t.strip() for t in str(text).split(",")):
        if not part:
            continue
        name, sep, path = part.partition("=")
        name = name.strip().lower()
        if not sep or not path.strip():
            raise argparse.ArgumentTypeError(f"{part!r} is not NAME=DIR (e.g. clip=/models/clip-vit-base-patch32)")
        if name not in LEARNED:
            raise argparse.ArgumentTypeError(f"no weights to give for metric {name!r}; metrics with weights: "
                                             f"{', '.join(LEARNED)}")
        out[name] = path.strip()
    return out


def scorer_for(model_name: str) -> SemanticScorer:
    """The scorer the model's registry entry names (the evaluator for models of the procedural
    scenes, the code agreement where no better one is known), with no learned metrics."""
    from stagevar.models.registry import model_entry
    name = model_entry(model_name).scorer
    if name not in SCORERS:
        raise ValueError(f"model {model_name!r} names the scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]()


def build_scorer(model_name: str, metrics: list[str] | None = None, weights: dict[str, str] | None = None,
                 device=None) -> SemanticScorer:
    """The scorer calibration compares images with.

    ``metrics`` None (the default): the model's own scorer; for a model whose own scorer is no
    semantic measure (the code agreement of the real checkpoints), the learned metrics of
    :data:`DEFAULT_LEARNED` whose weights are in the local caches or in ``weights``, without
    downloading. Named ``metrics``:
    exactly those (``evaluator`` / ``codes`` choose the base scorer; ``ssim`` is always
    measured), each learned one loaded or a clear error. Without any semantic measure the
    scorer still works (codes + SSIM) and a warning says so."""
    from calibrate.perceptual import LEARNED, MetricUnavailable
    weights = dict(weights or {})
    own = scorer_for(model_name)
    if metrics is None:
        base = own
        wanted = [n for n in LEARNED if n in weights or (not own.has_semantic_measure and n in DEFAULT_LEARNED)]
        strict = set(weights)
    else:
        if "evaluator" in metrics and own.name != "evaluator":
            raise StageVarError(f"--metric evaluator does not fit model {model_name!r}: the evaluator judges the embedded "
                                f"model's procedural scenes only. Metrics for this model: "
                                f"{', '.join(m for m in METRICS if m != 'evaluator')}.")
        base = SCORERS["evaluator"]() if "evaluator" in metrics else SCORERS["codes"]() if "codes" in metrics else own
        unused = sorted(set(weights) - set(metrics))
        if unused:
            raise StageVarError(f"--metric-weights names {', '.join(unused)}, which --metric does not list "
                                f"({','.join(metrics)}).")
        wanted = [n for n in metrics if n in LEARNED]
        strict = set(wanted)
    found, missing = [], []
    for name in wanted:
        try:
            # defaults come from the local caches only; a named metric may download like its library
            found.append(LEARNED[name](weights.get(name), device=device, download=name in strict))
        except MetricUnavailable:
            if name in strict:
                raise
            missing.append(name)
    base.metrics = tuple(found)
    if missing:
        log.info("learned metric(s) %s: no weights in the local caches (give --metric-weights NAME=DIR)", ", ".join(missing))
    if not base.has_semantic_measure:
        log.warning("NO SEMANTIC MEASURE: model %s is calibrated on the agreement of its own codes and SSIM only; "
                    "the policy records this. Give CLIP or DINOv2 weights (--metric clip,dino --metric-weights "
                    "clip=DIR,dino=DIR, or the Hugging Face cache) to choose plans on what the images show.", model_name)
    return base
