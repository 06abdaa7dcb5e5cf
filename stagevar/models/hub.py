"""Official weights found in the local Hugging Face cache, without network access.

``--weights hf`` (or no ``--weights`` and no ``$STAGEVAR_WEIGHTS``) looks for a model's files in
the hub cache that ``huggingface_hub`` / ``transformers`` fill (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; layout
``models--<org>--<name>/snapshots/<revision>/<file>``, the revision ``refs/main`` names first).
The files a loader expects in one weights directory are gathered as links in a fresh temporary
directory, so every loader reads them as it reads ``--weights DIR``. Nothing is downloaded:
fetch them once with ``huggingface-cli download`` (the table in the README names the repositories).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from stagevar.models.catalog import WeightsError

INFINITY_REPO = "FoundationVision/Infinity"
VAR_REPO = "FoundationVision/var"
T5_REPO = "google/flan-t5-xl"

#: model -> [(name in the weights directory, repository, names the file has there (first found wins);
#: None: the repository's whole snapshot, a directory)]
HF_FILES: dict[str, list[tuple[str, str, tuple[str, ...] | None]]] = {
    "infinity-2b": [("infinity_2b_reg.pth", INFINITY_REPO, ("infinity_2b_reg.pth",)),
                    ("infinity_vae_d32_reg.pth", INFINITY_REPO, ("infinity_vae_d32reg.pth", "infinity_vae_d32_reg.pth")),
                    ("flan-t5-xl", T5_REPO, None)],
    "infinity-8b": [("infinity_8b_weights", INFINITY_REPO, ("infinity_8b_weights",)),
                    ("infinity_vae_d56_f8_14_patchify.pth", INFINITY_REPO, ("infinity_vae_d56_f8_14_patchify.pth",)),
                    ("flan-t5-xl", T5_REPO, None)],
    **{f"var-d{d}": [(f"var_d{d}.pth", VAR_REPO, (f"var_d{d}.pth",)),
                     ("vae_ch160v4096z32.pth", VAR_REPO, ("vae_ch160v4096z32.pth",))] for d in (16, 20, 24, 30, 36)},
}


def hub_cache() -> Path:
    """The Hugging Face hub cache directory, as ``huggingface_hub`` resolves it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def snapshots(repo: str, cache: Path | None = None) -> list[Path]:
    """The cached snapshot directories of ``repo``: the one ``refs/main`` names first, then the
    others, newest first."""
    root = (cache or hub_cache()) / f"models--{repo.replace('/', '--')}"
    snaps = root / "snapshots"
    if not snaps.is_dir():
        return []
    found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    main = root / "refs" / "main"
    if main.is_file():
        head = snaps / main.read_text().strip()
        found = ([head] if head in found else []) + [p for p in found if p != head]
    return found


def _locate(repo: str, names: tuple[str, ...] | None, cache: Path) -> Path | None:
    for snap in snapshots(repo, cache):
        if names is None:
            if (snap / "config.json").is_file():
                return snap
            continue
        for name in names:
            if (snap / name).exists():
                return snap / name
    return None


def weights_from_hub_cache(model: str, cache: Path | None = None) -> Path:
    """A directory of links to ``model``'s official files in the hub cache (see the module
    docstring); :class:`WeightsError` naming every missing file and where it was looked for."""
    if model not in HF_FILES:
        raise WeightsError(f"--weights hf: no Hugging Face files are known for model {model!r}; models with official "
                           f"files: {', '.join(sorted(HF_FILES))}. Pass --weights DIR.")
    cache = cache or hub_cache()
    found, missing = {}, []
    for local, repo, names in HF_FILES[model]:
        hit = _locate(repo, names, cache)
        if hit is None:
            missing.append(f"{repo}: {' or '.join(names) if names else '(the model snapshot)'}")
        else:
            found[local] = hit
    if missing:
        raise WeightsError(f"model {model!r} needs its official weights, which are not in the Hugging Face cache {cache} "
                           f"(missing {'; '.join(missing)}). Download them once (huggingface-cli download REPO FILE), or "
                           "pass --weights DIR (or set $STAGEVAR_WEIGHTS). For speed-only runs use --random-weights.")
    view = Path(tempfile.mkdtemp(prefix=f"stagevar-{model}-hf-"))
    atexit.register(shutil.rmtree, view, True)
    for local, target in found.items():
        (view / local).symlink_to(target.resolve(), target_is_directory=target.is_dir())
    return view
