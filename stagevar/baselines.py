"""Published acceleration methods, each reproduced as an operating point of the stagevar runtime.

The builders return an :class:`~stagevar.policy.OperatingPoint` for a loaded adapter, so the
benchmark (``stagevar-calibrate bench``) runs every method through the same per-scale loop, the same token
ops and the same timing code as the searched policies. :func:`baseline_policy` wraps points in a
:class:`~stagevar.policy.Policy` bound to the adapter (that is how they are validated and saved).

=====================  ========================================================================
builder                what it reproduces
=====================  ========================================================================
:func:`paper_policy`    StageVAR's hand-set configuration (arXiv 2512.16483)
:func:`fastvar_policy`  FastVAR's cached token pruning, Infinity variant (arXiv 2503.23367,
                        github.com/csguoh/FastVAR)
:func:`skipvar_policy`  SkipVAR's two acceleration strategies, one static point each
                        (arXiv 2506.08908, github.com/fakerone-li/SkipVAR)
=====================  ========================================================================

Every builder is defined relative to the model's own schedule (``n`` scales, ``D`` layers), so
it applies to any registered model; the numbers quoted upstream are for Infinity-2B at 1024x1024
(13 scales, side 1 ... 64, 32 layers), where the relative definition gives exactly the upstream
scales and layers.
"""
from __future__ import annotations

from stagevar.policy import OperatingPoint, Policy, ScalePlan, base_provenance, binding_for, default_stages

#: names accepted by :func:`build_baseline` (and ``stagevar-calibrate bench --baselines``)
BASELINES = ("paper", "fastvar", "skipvar-skip", "skipvar-uncond")


def _point(n: int, plans: dict[int, ScalePlan], first_refinement: int | None = None) -> OperatingPoint:
    full = tuple(plans.get(k, ScalePlan(k)) for k in range(n))
    first = next((p.scale for p in full if not p.is_identity), n) if first_refinement is None else first_refinement
    return OperatingPoint(default_stages(n, first), full)


def _require_scales(adapter, need: int, what: str) -> int:
    n = len(adapter.scale_schedule)
    if n < need:
        raise ValueError(f"{what} needs a model with at least {need} scales; {adapter.fingerprint().model} has {n}")
    return n


def paper_policy(adapter, keep: float = 0.5, refinement_scales: int = 3) -> OperatingPoint:
    """StageVAR's hand-set configuration (the "paper" point).

    Source: Li et al., "StageVAR: Stage-Aware Acceleration for Visual Autoregressive Models",
    arXiv 2512.16483 (github.com/sen-mao/StageVAR holds no code at the time of writing).

    Reproduced: the semantic and structure stages run untouched; the fidelity-refinement stage is
    the last three scales (Infinity-2B 1024²: 40x40, 48x48, 64x64); there (1) classifier-free
    guidance is dropped - only the conditional branch runs (``guidance: cond_only``, the batch
    halves) and (2) the features are reduced to low rank by a random projection along the token
    axis (``selection: random_projection``), computed through all layers, the other tokens
    restored from the previous scale's cached hidden states (``restore: cached_update``).

    Approximated: the paper fixes the projection rank per scale by hand; that exact rank is not
    reproduced here. ``keep`` (default 0.5: half of each refinement scale's tokens) stands in for
    it and is the same at every refinement scale; our projection is grid-cell based
    (:mod:`stagevar.ops.projection`), so the computed count is ``keep x M`` rounded to a grid.
    ``refinement_scales`` moves the stage boundary (3 = the paper's).
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    n = _require_scales(adapter, refinement_scales + 1, "paper_policy")
    first = n - refinement_scales
    plans = {k: ScalePlan(k, guidance="cond_only", keep=keep, selection="random_projection", restore="cached_update")
             for k in range(first, n)}
    return _point(n, plans, first)


def fastvar_layers(depth: int) -> tuple[int, int]:
    """FastVAR's pruned layer range ``[3, 28)`` of 32 layers, scaled to a ``depth``-layer model."""
    a, b = round(3 * depth / 32), round(28 * depth / 32)
    b = max(1, min(depth, b))
    a = max(0, min(a, b - 1))
    return a, b


#: FastVAR, Infinity variant: share of tokens pruned at the two scales before the last two
#: (``ratio_hard_code = {32: 0.4, 40: 0.5}`` in Infinity/infinity/models/fastvar_utils.py).
FASTVAR_PRUNE_RATIOS = (0.4, 0.5)


def fastvar_policy(adapter, skip_last: bool = True) -> OperatingPoint:
    """FastVAR's cached token pruning, as its Infinity code runs it.

    Source: Guo et al., "FastVAR: Linear Visual Autoregressive Modeling via Cached Token
    Pruning", arXiv 2503.23367; code github.com/csguoh/FastVAR, Infinity variant:
    ``Infinity/infinity/models/fastvar_utils.py`` (``compute_merge``,
    ``masked_previous_scale_cache``), ``Infinity/infinity/models/fastvar_basic.py``
    (``FastVARCrossAttnBlock.forward``) and ``Infinity/infinity/models/infinity.py``
    (``autoregressive_infer_cfg``).

    What upstream does on Infinity-2B at 1024² (scale sides 1, 2, 4, 6, 8, 12, 16, 20, 24, 32,
    40, 48, 64):

    * scales 32 and 40 (``prune_scale_list=[32, 40]``, the two scales before the last two): in
      layers 3..27 (``layer_idx in range(3, 28)``, 25 of 32) only the tokens with the largest
      squared deviation from the scale's mean hidden state are computed; ``ratio_hard_code =
      {32: 0.4, 40: 0.5}`` is the share *pruned*, i.e. 60% / 50% kept; each computed token keeps
      its true RoPE position; the pruned tokens are filled from cached outputs of the 24x24 scale,
      area-upsampled;
    * scales 48 and 64 (the last two) are **not computed at all**: ``autoregressive_infer_cfg``
      starts its per-scale loop with ``if 48 == pn[2] or 64 == pn[2]: continue`` (commented "we
      find use 100% pruning ratio at the last two scales is acceptable"); the image is decoded
      from the codes accumulated up to 40x40, which were already upsampled to the final 64x64
      latent (``summed_codes += F.interpolate(codes, size=vae_scale_schedule[-1])``);
    * classifier-free guidance is kept at every computed scale.

    Reproduced here: ``selection: deviation`` with ``keep`` 0.6 / 0.5 at scales ``n-4`` and
    ``n-3``, ``layers`` ``[round(3D/32), round(28D/32))`` (``[3, 28)`` for D = 32),
    ``restore: cached_update``, guidance ``cfg``; scales ``n-2`` and ``n-1`` ``skip: true``
    (our runtime's skip decodes the accumulated full-size latent, as upstream). ``skip_last=False``
    computes the last two scales normally instead (pruning only; not what the Infinity code runs).

    Approximated (differences to upstream):

    * selection and restoration: upstream re-selects the tokens before every sub-layer (self-
      attention, cross-attention, FFN) of every pruned layer and restores after each of them; we
      select once at the first pruned layer and restore once after the last one (the restored
      tokens receive the previous scale's change over the pruned layers, ``x_a + up(prev_b -
      prev_a)``, the same "own input + cached update" rule applied to the whole range);
    * the cache: upstream always restores from the 24x24 scale (``cached_size = [24, 24]``), area
      interpolation; we restore from the immediately preceding scale (for 32: the 24x24 scale, as
      upstream; for 40: the 32x32 scale's restored full grid), bilinear interpolation;
    * deviation: upstream scores every row of the guided batch independently; we score the
      conditional rows and reuse the choice for their unconditional rows;
    * token count: upstream keeps ``M - int(M x ratio)`` tokens, we keep ``round(keep x M)``
      (at most one token apart).
    """
    n = _require_scales(adapter, 5, "fastvar_policy")
    layers = fastvar_layers(adapter.num_layers)
    plans: dict[int, ScalePlan] = {}
    for k, pruned in zip((n - 4, n - 3), FASTVAR_PRUNE_RATIOS):
        plans[k] = ScalePlan(k, guidance="cfg", keep=round(1.0 - pruned, 6), selection="deviation",
                             restore="cached_update", layers=layers)
    if skip_last:
        plans[n - 2] = ScalePlan(n - 2, skip=True)
        plans[n - 1] = ScalePlan(n - 1, skip=True)
    return _point(n, plans)


SKIPVAR_VARIANTS = ("skip", "uncond")


def skipvar_policy(adapter, variant: str = "skip", steps: int | None = None) -> OperatingPoint:
    """One static strategy of SkipVAR.

    Source: Li et al., "SkipVAR: Accelerating Visual Autoregressive Modeling via Adaptive
    Frequency-Aware Skipping", arXiv 2506.08908; code github.com/fakerone-li/SkipVAR (a patched
    Infinity; its repository ships the trained decision models).

    SkipVAR identifies two redundancies of the late steps and one strategy for each:

    * ``variant="skip"`` - *step skipping*: generation stops before the last ``steps`` scales
      (default 1; 2 is the more aggressive member) and the image is decoded from the latent
      accumulated so far (``skip: true`` on those scales);
    * ``variant="uncond"`` - *unconditional branch replacement*: from a late scale on the
      unconditional branch is not computed and the conditional prediction is used in its place,
      which makes the guided logits equal to the conditional ones (``guidance: cond_only`` on the
      last ``steps`` scales, default 2; the batch halves there).

    Approximated: SkipVAR is *sample-adaptive* - a small decision model (trained per SSIM
    threshold, e.g. ``decision_model_ssim_88``) reads high-frequency features of the partially
    generated image and picks, per sample, which strategy and starting step to apply (or none).
    That decision model is not reproduced; each variant here is one fixed member of its candidate
    set applied to every sample, so it bounds what the adaptive method can reach rather than
    reproducing its average.
    """
    if variant not in SKIPVAR_VARIANTS:
        raise ValueError(f"unknown SkipVAR variant {variant!r}; expected one of {', '.join(SKIPVAR_VARIANTS)}")
    if steps is None:
        steps = 1 if variant == "skip" else 2
    n = _require_scales(adapter, steps + 2, f"skipvar_policy({variant!r}, steps={steps})")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if variant == "skip":
        plans = {k: ScalePlan(k, skip=True) for k in range(n - steps, n)}
    else:
        plans = {k: ScalePlan(k, guidance="cond_only") for k in range(n - steps, n)}
    return _point(n, plans)


def build_baseline(name: str, adapter, *, paper_keep: float = 0.5) -> OperatingPoint:
    """A baseline by name (one of :data:`BASELINES`)."""
    if name == "paper":
        return paper_policy(adapter, keep=paper_keep)
    if name == "fastvar":
        return fastvar_policy(adapter)
    if name == "skipvar-skip":
        return skipvar_policy(adapter, "skip")
    if name == "skipvar-uncond":
        return skipvar_policy(adapter, "uncond")
    raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")


BASELINE_SOURCES = {
    "paper": "StageVAR hand-set (arXiv 2512.16483)",
    "fastvar": "FastVAR, Infinity code (csguoh/FastVAR)",
    "skipvar-skip": "SkipVAR step skipping, static (arXiv 2506.08908)",
    "skipvar-uncond": "SkipVAR uncond. branch replacement, static (arXiv 2506.08908)",
}


def baseline_policy(adapter, names=BASELINES, *, paper_keep: float = 0.5) -> Policy:
    """A policy bound to ``adapter`` holding one operating point per named baseline (validated
    like any policy file; ``Policy.save`` writes it)."""
    names = list(names)
    if not names:
        raise ValueError("no baseline named")
    points = {nm: build_baseline(nm, adapter, paper_keep=paper_keep) for nm in names}
    pol = Policy(model=binding_for(adapter), operating_points=points, default=names[0],
                 provenance=base_provenance(source="stagevar.baselines",
                                            baselines={nm: BASELINE_SOURCES[nm] for nm in names}))
    # validate through the strict loader (stage rules, guidance order, skip order)
    return Policy.from_dict(pol.to_dict(), src=f"baselines for {pol.model.name}")


def describe(point: OperatingPoint, depth: int) -> str:
    """One line: what each non-identity scale does (for tables and logs)."""
    parts = []
    for p in point.plans:
        if p.is_identity:
            continue
        if p.skip:
            parts.append(f"{p.scale}:skip")
            continue
        s = f"{p.scale}:" + ("cond" if p.guidance == "cond_only" else "cfg")
        if p.is_subset:
            r = p.layer_range(depth)
            sel = {"random_projection": "rp", "deviation": "dev", "uniform": "uni"}[p.selection]
            s += f"+{sel}@{p.keep_tokens if p.keep_tokens is not None else f'{p.keep:g}'}"
            if (r.start, r.stop) != (0, depth):
                s += f"[L{r.start}-{r.stop - 1}]"
        parts.append(s)
    return " ".join(parts) or "identity"


__all__ = ["BASELINES", "BASELINE_SOURCES", "paper_policy", "fastvar_policy", "fastvar_layers", "skipvar_policy",
           "build_baseline", "baseline_policy", "describe", "FASTVAR_PRUNE_RATIOS", "SKIPVAR_VARIANTS"]
