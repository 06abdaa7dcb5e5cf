"""`stagevar evaluate`: the GenEval-like per-category table for the embedded model (or any images).

Without ``--images`` it generates the chosen split (default: held-out prompts, 4 seeds each) with
the model and an optional policy, and scores the images with the analytic evaluator. With
``--images DIR --prompts FILE`` it scores existing PNGs.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from stagevar.errors import StageVarError
from stagevar.toy.prompts import CATEGORIES


def print_table(result: dict, title: str, stream=sys.stdout) -> None:
    print(title, file=stream)
    print(f"  {'category':<14} {'score':>6} {'images':>7}", file=stream)
    for c in CATEGORIES:
        if c in result:
            print(f"  {c:<14} {result[c]:>6.3f} {result['counts'].get(c, 0):>7}", file=stream)
    print(f"  {'overall':<14} {result['overall']:>6.3f} {result['num_images']:>7}", file=stream)


def generate_and_evaluate(model, items: list[dict], seeds: list[int], runtime, batch_size: int, progress: bool = True):
    """Images for every (item, seed), then the evaluator's table. Returns (result, seconds)."""
    import torch
    from stagevar.toy.evaluate import evaluate
    images, specs = [], []
    t0 = time.perf_counter()
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(items) * len(seeds), desc="generating", disable=not progress, file=sys.stderr, leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    for seed in seeds:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            res = runtime.generate([it["prompt"] for it in chunk], seed=seed)
            u8 = (res.images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images += list(u8)
            specs += [it["spec"] for it in chunk]
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return evaluate(images, specs), time.perf_counter() - t0


def _need_scipy() -> None:
    """The evaluator measures connected components with scipy.ndimage, which the runtime alone does
    not install: one clear error before any work."""
    try:
        import scipy.ndimage  # noqa: F401
    except ImportError:
        raise StageVarError("'stagevar evaluate' needs scipy for the evaluator (connected components): install it "
                            "with pip install -e '.[evaluate]' (or '.[calibrate]', which includes it).") from None


def run_evaluate(args) -> int:
    _need_scipy()
    if args.images is not None:
        from stagevar.toy.evaluate import evaluate_directory
        if args.prompts is None:
            raise StageVarError("--images needs --prompts FILE (one prompt per image, in file order, or JSONL {file, prompt}).")
        result = evaluate_directory(args.images, args.prompts)
        title = f"evaluator scores for {args.images}"
    else:
        from stagevar.models.registry import load_model_from_args
        from stagevar.policy import load_policy
        from stagevar.runtime import Runtime
        from stagevar.toy.prompts import make_split
        if args.seeds < 1 or args.batch_size < 1:
            raise StageVarError("--seeds and --batch-size must be >= 1.")
        n = args.limit if args.limit is not None else 120
        if n < 1:
            raise StageVarError(f"--limit must be >= 1, got {n}.")
        items = make_split(args.split, n, seed=0)
        policy = load_policy(args.policy) if args.policy else None
        model = load_model_from_args(args)
        runtime = Runtime(model, policy, args.operating_point, engine=args.engine)
        result, secs = generate_and_evaluate(model, items, list(range(args.seeds)), runtime, args.batch_size)
        title = (f"{model.name} on {len(items)} {args.split} prompts x {args.seeds} seed(s)"
                 + (f", policy {args.policy}" + (f" [{args.operating_point}]" if args.operating_point else "") if policy else "")
                 + f" ({secs:.0f}s)")
    if args.json:
        print(json.dumps({k: v for k, v in result.items()}, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
    else:
        print_table(result, title)
    return 0
