"""The options every ``stagevar-calibrate`` command shares (model, prompts, seeds, device, ...) and
the setup they imply: used by the main command, ``measure`` and ``worker``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stagevar.engine import ENGINE_HELP, ENGINES
from stagevar.errors import StageVarError
from stagevar.guidance import GUIDANCE_HELP, guidance_argument


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    from stagevar.models.registry import add_model_arguments
    add_model_arguments(p, "seeded random weights (latency only; quality is meaningless)")
    p.add_argument("--prompts", type=Path, help="calibration prompts, one per line (default: a bundled set for the model)")
    p.add_argument("--num-prompts", type=int, default=8, help="bundled calibration prompts used (default 8)")
    p.add_argument("--prompt-draw", type=int, default=0,
                   help="which draw of the bundled calibration prompts (default 0; another draw checks that the stages "
                        "and plans do not depend on the prompts)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds per prompt (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generated batch; latency budgets refer to it (default 8)")
    p.add_argument("--guidance", type=guidance_argument, help=GUIDANCE_HELP)
    p.add_argument("--out", type=Path, default=Path("runs/calibration"), help="working directory: record, study, report (default runs/calibration)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--engine", choices=[*ENGINES, "auto"], default="auto",
                   help="the engine latencies are measured with, and recorded in the policy: " + ENGINE_HELP)
    from calibrate.metrics import METRICS, parse_metric_list, parse_metric_weights
    p.add_argument("--metric", type=parse_metric_list, metavar="NAMES",
                   help=f"what images are compared with, comma-separated from {', '.join(METRICS)} (default: the model's "
                        "own scorer - the evaluator for the embedded model - and, for real checkpoints, CLIP, DINOv2 and "
                        "LPIPS when their weights are in the local caches; SSIM is always measured)")
    p.add_argument("--metric-weights", type=parse_metric_weights, default={}, metavar="NAME=DIR,...",
                   help="local copies of the learned metrics' weights, e.g. clip=DIR1,dino=DIR2,lpips=DIR3 (a Hugging Face "
                        "save_pretrained directory for clip and dino; for lpips a directory with torchvision's "
                        "alexnet-owt-7be5be79.pth and the lpips package's alex.pth; for dists one with "
                        "vgg16-397923af.pth and DISTS_pytorch's weights.pt)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def apply_model_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """Give ``parser`` the defaults the model named in ``argv`` (``--model``, else the default
    model) registers for its options (``ModelEntry.calibration``), so that ``--help`` shows them and
    an option given on the command line still wins. An unknown or missing model name changes
    nothing: the command's own parse and load report it."""
    from stagevar.models.catalog import DEFAULT_MODEL
    from stagevar.models.registry import calibration_defaults
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=DEFAULT_MODEL)
    try:
        known, _ = pre.parse_known_args(argv)
    except (SystemExit, argparse.ArgumentError):
        return parser
    dests = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in calibration_defaults(known.model).items() if k in dests})
    return parser


def setup(args):
    import torch
    from stagevar.models.registry import load_model_from_args
    from stagevar.perf import steady_allocator
    steady_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise StageVarError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.prompt_draw < 0:
        raise StageVarError(f"--prompt-draw must be >= 0, got {args.prompt_draw}.")
    try:
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise StageVarError(f"--seeds must be comma-separated integers, got {args.seeds!r}.") from None
    if not seeds:
        raise StageVarError("--seeds is empty.")
    from calibrate.prompts import bundled, read_prompt_file
    prompts = read_prompt_file(args.prompts) if args.prompts else bundled(args.model, "calibration", args.num_prompts, draw=args.prompt_draw)
    model = load_model_from_args(args)
    model.encode_prompts(prompts)            # validate every prompt up front (clear error naming the bad one)
    return model, prompts, seeds


def add_search_images_argument(p) -> None:
    """``--search-images``: shared by the calibrate command and its workers (a study's trials must
    all be measured alike)."""
    p.add_argument("--search-images", type=int, default=32, metavar="N",
                   help="images a trial is measured on while it ranks in the top quarter of the trials so far: the "
                        "record's images first, then the same prompts with other seeds, a set at a time (default %(default)s; "
                        "the record's count: every trial on the record's images only)")


def scorer_from_args(args, model):
    """The scorer ``--metric`` / ``--metric-weights`` ask for, on the model's device
    (:func:`calibrate.metrics.build_scorer`)."""
    from calibrate.metrics import build_scorer
    return build_scorer(model.name, getattr(args, "metric", None), getattr(args, "metric_weights", None) or {},
                        device=model.device)
