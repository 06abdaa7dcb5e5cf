"""Learned image metrics for calibration: CLIP and DINOv2 (semantic), LPIPS (structure).

Each compares an accelerated image with the full model's image of the same prompt and seed and
gives a per-image agreement in [0, 1] (1 = the same image):

* ``clip``: cosine of the CLIP image embeddings (and, reported beside it, the image-prompt
  cosine ``clip_text``), from Hugging Face ``transformers``' ``CLIPModel``;
* ``dino``: cosine of the DINOv2 class-token embeddings (``transformers``' ``Dinov2Model``);
* ``lpips``: 1 - LPIPS distance (Zhang et al. 2018, version 0.1, AlexNet trunk). The trunk is the
  five convolutions of torchvision's AlexNet, loaded from torchvision's weight file, and the
  linear heads are the ``lpips`` package's ``weights/v0.1/alex.pth``;
* ``dists``: 1 - DISTS distance (Ding et al. 2020): VGG16's thirteen convolutions (torchvision's
  weight file) with L2 pooling, and the ``DISTS_pytorch`` package's learned ``weights.pt``.

The two trunks are defined here (a few lines each, under torchvision's parameter names) rather
than imported from ``lpips`` / ``DISTS_pytorch`` / ``torchvision``, because torchvision's wheels
are built per torch build (a CPU torch cannot load the CUDA torchvision wheel); the test suite
checks both against the packages' own forward passes.

Weights are found the way each library finds them: a local directory given with
``--metric-weights NAME=DIR``, else the Hugging Face cache (``from_pretrained`` of the model id,
offline first) and torch hub's checkpoint directory for the AlexNet trunk. Images are resized and
normalised here, in torch and in batches, so no image-processing package is needed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stagevar.errors import StageVarError

#: default Hugging Face model ids (looked up in the local cache)
CLIP_ID = "openai/clip-vit-base-patch32"
DINO_ID = "facebook/dinov2-base"
#: torchvision's ImageNet AlexNet file (torch hub's checkpoint directory) and the lpips heads
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_HEADS_FILE = "alex.pth"
#: torchvision's ImageNet VGG16 file and the DISTS_pytorch package's alpha / beta
VGG16_FILE = "vgg16-397923af.pth"
DISTS_WEIGHTS_FILE = "weights.pt"

_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _as_tensor(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device).clamp(0, 1)


def resize_center(x: torch.Tensor, size: int, shortest: int | None = None) -> torch.Tensor:
    """Resize (bicubic, antialiased) so the shorter side is ``shortest`` (default ``size``), then
    crop the centre ``size`` x ``size`` square (what CLIP's and DINOv2's image processors do)."""
    shortest = max(size, shortest or size)
    h, w = x.shape[-2:]
    s = shortest / min(h, w)
    nh, nw = max(shortest, round(h * s)), max(shortest, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size]


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Crop size, resize of the shorter side, mean and std of a Hugging Face image processor."""

    crop: int
    shortest: int
    mean: tuple
    std: tuple

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _normalise(resize_center(x, self.crop, self.shortest), self.mean, self.std)


def preprocessing(source: str | Path, default: Preprocessing) -> Preprocessing:
    """The model's ``preprocessor_config.json`` (in its directory, or in the Hugging Face cache for
    a model id), else ``default``."""
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from transformers.utils import cached_file
            found = cached_file(str(source), "preprocessor_config.json", local_files_only=True,
                                _raise_exceptions_for_missing_entries=False)
        except Exception:  # noqa: BLE001 - no config in the cache: the default
            found = None
        if not found:
            return default
        path = Path(found)
    cfg = json.loads(path.read_text())

    def side(v, key):
        return v.get(key) or v.get("height") if isinstance(v, dict) else v
    crop = side(cfg.get("crop_size"), "height") or default.crop
    shortest = side(cfg.get("size"), "shortest_edge") or crop
    return Preprocessing(int(crop), int(shortest), tuple(cfg.get("image_mean", default.mean)),
                         tuple(cfg.get("image_std", default.std)))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(0, 1).cpu().numpy().astype(np.float64)


def _pooled(out) -> torch.Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    return out if torch.is_tensor(out) else out.pooler_output


def load_hf(cls, name: str, source: str | None, model_id: str, download: bool = True):
    """``cls.from_pretrained`` of a local directory (``source``) or of ``model_id`` from the
    Hugging Face cache (offline first; the network only when the cache lacks it, ``download`` is
    set and the hub is not set offline). Returns (model, local directory or None)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()              # our own bars show the calibration's progress
    if source is not None:
        d = Path(source)
        if not (d / "config.json").is_file():
            raise StageVarError(f"--metric-weights {name}={source}: no Hugging Face model there (config.json missing); "
                                f"give a directory written by save_pretrained, e.g. a snapshot of {model_id}.")
        try:
            return cls.from_pretrained(d), d
        except Exception as e:  # noqa: BLE001 - a broken copy, named with the library's reason
            raise StageVarError(f"--metric-weights {name}={source}: cannot load it as {cls.__name__}: {e}") from None
    try:
        return cls.from_pretrained(model_id, local_files_only=True), None
    except Exception:  # noqa: BLE001 - not in the cache: try the hub unless offline
        if not download or os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
            raise MetricWeightsMissing(name, model_id) from None
    try:
        return cls.from_pretrained(model_id), None
    except Exception:  # noqa: BLE001
        raise MetricWeightsMissing(name, model_id) from None


class MetricUnavailable(StageVarError):
    """A learned metric that cannot run here (no weights, or its library is not installed)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.metric = name


class MetricWeightsMissing(MetricUnavailable):
    def __init__(self, name: str, where: str):
        super().__init__(name, f"metric {name!r}: no weights found ({where} is not in the local cache and could not be "
                               f"downloaded). Give a local copy with --metric-weights {name}=DIR.")


def _transformers(name: str):
    try:
        import transformers
    except ImportError:
        raise MetricUnavailable(name, f"metric {name!r} needs the 'transformers' package: pip install 'stagevar[metrics]'") from None
    return transformers


class ImageMetric:
    """Per-image agreement in [0, 1] of images with their references (1 = the same image).
    ``kind``: "semantic" (what the image shows) or "structure" (how it is drawn)."""

    name = "metric"
    kind = "semantic"
    source = ""                      # where the weights came from (recorded in the report and policy)
    seconds = 0.0                    # time spent scoring, and images scored (set per instance as it works)
    images = 0

    def agreement(self, images: np.ndarray, references: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def prompt_score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray | None:
        """Image-prompt score (CLIP score), or None when the metric has none."""
        return None

    def measure(self, images: np.ndarray, references: np.ndarray,
                prompts: list[str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(agreement with the references, image-prompt score or None), in one pass where a
        metric can share the work."""
        return self.agreement(images, references), (self.prompt_score(images, prompts) if prompts is not None else None)


class _Embedding(ImageMetric):
    """Cosine agreement of embeddings of a Hugging Face model (``MODEL_CLASS`` of ``MODEL_ID``,
    or a local copy), images embedded in batches on the metric's device. The references are
    usually the same full-model images call after call (every variant, trial and scale is
    compared with them), so the embeddings of the last reference array are kept."""

    batch = 32
    MODEL_CLASS = "AutoModel"
    MODEL_ID = ""

    def __init__(self, source: str | None = None, device=None, download: bool = True):
        self.device = torch.device(device or "cpu")
        model, self.directory = load_hf(getattr(_transformers(self.name), self.MODEL_CLASS), self.name, source,
                                        self.MODEL_ID, download)
        self.model = model.eval().to(self.device)
        self.source = str(self.directory) if self.directory else self.MODEL_ID
        self._reference: tuple[np.ndarray, torch.Tensor] | None = None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def embeddings(self, images: np.ndarray) -> torch.Tensor:
        return torch.cat([self.embed(_as_tensor(images[i:i + self.batch], self.device))
                          for i in range(0, len(images), self.batch)])

    def reference_embeddings(self, references: np.ndarray) -> torch.Tensor:
        if self._reference is None or self._reference[0] is not references:
            self._reference = (references, self.embeddings(references))
        return self._reference[1]

    def agreement(self, images, references):
        return _cosine(self.embeddings(images), self.reference_embeddings(references))


class ClipMetric(_Embedding):
    name, kind = "clip", "semantic"
    MODEL_CLASS, MODEL_ID = "CLIPModel", CLIP_ID

    def __init__(self, source: str | None = None, device=None, download: bool = True):
        super().__init__(source, device, download)
        size = self.model.config.vision_config.image_size
        self.prepare = preprocessing(self.directory or CLIP_ID, Preprocessing(size, size, _CLIP_MEAN, _CLIP_STD))
        self._tokenizer = None

    def embed(self, x):
        return _pooled(self.model.get_image_features(pixel_values=self.prepare(x)))

    @torch.inference_mode()
    def _prompt_score(self, image_embeddings: torch.Tensor, prompts: list[str]) -> np.ndarray | None:
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.directory or CLIP_ID)
            except Exception:  # noqa: BLE001 - a copy without a tokenizer: image-image agreement only
                self._tokenizer = False
        if not self._tokenizer:
            return None
        limit = self.model.config.text_config.max_position_embeddings
        tok = self._tokenizer(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        text = _pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                    attention_mask=tok["attention_mask"].to(self.device)))
        return F.cosine_similarity(image_embeddings.float(), text.float(), dim=-1).cpu().numpy().astype(np.float64)

    def prompt_score(self, images, prompts):
        return self._prompt_score(self.embeddings(images), prompts)

    def measure(self, images, references, prompts=None):
        emb = self.embeddings(images)                       # embedded once for both numbers
        agreement = _cosine(emb, self.reference_embeddings(references))
        return agreement, (self._prompt_score(emb, prompts) if prompts is not None else None)


class DinoMetric(_Embedding):
    name, kind = "dino", "semantic"
    MODEL_CLASS, MODEL_ID = "AutoModel", DINO_ID

    def __init__(self, source: str | None = None, device=None, download: bool = True):
        super().__init__(source, device, download)
        crop = min(224, self.model.config.image_size)           # DINOv2's processor: shorter side 256, crop 224
        self.prepare = preprocessing(self.directory or DINO_ID, Preprocessing(crop, round(crop * 256 / 224),
                                                                              _IMAGENET_MEAN, _IMAGENET_STD))

    def embed(self, x):
        out = self.model(pixel_values=self.prepare(x))
        return out.pooler_output           # the class token after the final layer norm


class AlexNetTrunk(torch.nn.Module):
    """torchvision's AlexNet ``features`` (same module indices, so its state dict loads), returning
    the five ReLU outputs LPIPS compares."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 11, stride=4, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2),
            torch.nn.Conv2d(64, 192, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2),
            torch.nn.Conv2d(192, 384, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(384, 256, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(256, 256, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2))

    CHANNELS = (64, 192, 384, 256, 256)
    TAPS = (1, 4, 7, 9, 11)                   # indices of the ReLUs LPIPS reads

    def forward(self, x):
        outs = []
        for i, layer in enumerate(self.features[:12]):
            x = layer(x)
            if i in self.TAPS:
                outs.append(x)
        return outs


def _trunk_files(metric: str, source: str | None, trunk_file: str, trunk_what: str, heads_file: str, heads_what: str,
                 package: str, in_package: tuple[str, ...]) -> tuple[Path, Path]:
    """(trunk weights, heads weights) of LPIPS / DISTS: from ``source`` (a directory holding both;
    the trunk by its torchvision name's stem), else torch hub's checkpoint directory and the
    installed ``package`` (located, not imported: it imports torchvision)."""
    if source is not None:
        d = Path(source)
        trunks = sorted(d.glob(trunk_file.split("-")[0] + "*.pth")) if d.is_dir() else []
        heads = d / heads_file
        if not trunks or not heads.is_file():
            raise StageVarError(f"--metric-weights {metric}={source}: the directory needs {trunk_what} ({trunk_file}) and "
                                f"{heads_what} ({heads_file}); found "
                                f"{', '.join(p.name for p in d.iterdir()) if d.is_dir() else 'no such directory'}.")
        return trunks[0], heads
    trunk = Path(torch.hub.get_dir()) / "checkpoints" / trunk_file
    spec = importlib.util.find_spec(package)
    heads = (Path(spec.submodule_search_locations[0]).joinpath(*in_package, heads_file)
             if spec and spec.submodule_search_locations else None)
    if not trunk.is_file() or heads is None or not heads.is_file():
        raise MetricWeightsMissing(metric, f"{trunk_what} ({trunk_file}) in {trunk.parent} and the {package} package's "
                                           f"{heads_file}")
    return trunk, heads


def _upsampled(images: np.ndarray, device, min_side: int) -> torch.Tensor:
    """Images as a tensor, upsampled (bilinear) so the shorter side is at least ``min_side``."""
    x = _as_tensor(images, device)
    if min(x.shape[-2:]) < min_side:
        s = min_side / min(x.shape[-2:])
        x = F.interpolate(x, size=(round(x.shape[-2] * s), round(x.shape[-1] * s)), mode="bilinear", align_corners=False)
    return x


class LpipsMetric(ImageMetric):
    """1 - LPIPS distance (v0.1, AlexNet trunk, linear heads; images in [0, 1] mapped to [-1, 1])."""

    name, kind = "lpips", "structure"
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)
    MIN_SIDE = 64                               # smaller images are upsampled (AlexNet's stride is 4)
    batch = 16

    def __init__(self, source: str | None = None, device=None, download: bool = True):
        """``download`` is accepted for symmetry: the files are only ever looked up locally."""
        self.device = torch.device(device or "cpu")
        trunk_file, heads_file = _trunk_files("lpips", source, ALEXNET_FILE, "torchvision's AlexNet weights",
                                              LPIPS_HEADS_FILE, "the lpips v0.1 heads", "lpips", ("weights", "v0.1"))
        self.source = str(trunk_file.parent) if source else f"{trunk_file} + {heads_file}"
        self.trunk = AlexNetTrunk()
        try:
            state = torch.load(trunk_file, map_location="cpu", weights_only=True)
            self.trunk.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")})
            heads = torch.load(heads_file, map_location="cpu", weights_only=True)
            self.heads = [heads[f"lin{i}.model.1.weight"].float() for i in range(len(AlexNetTrunk.CHANNELS))]
        except Exception as e:  # noqa: BLE001 - a file of another network, named with the reason
            raise StageVarError(f"lpips weights {trunk_file}, {heads_file}: not AlexNet / LPIPS v0.1 weights ({e}).") from None
        self.trunk = self.trunk.eval().to(self.device)
        self.heads = [h.to(self.device) for h in self.heads]

    def _prepare(self, images: np.ndarray) -> torch.Tensor:
        return _normalise(_upsampled(images, self.device, self.MIN_SIDE) * 2 - 1, self.SHIFT, self.SCALE)

    @torch.inference_mode()
    def distance(self, images: np.ndarray, references: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch):
            fa = self.trunk(self._prepare(images[i:i + self.batch]))
            fb = self.trunk(self._prepare(references[i:i + self.batch]))
            d = 0
            for a, b, w in zip(fa, fb, self.heads):
                a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                d = d + F.conv2d((a - b) ** 2, w).mean(dim=(2, 3))
            out.append(d.flatten())
        return torch.cat(out).cpu().numpy().astype(np.float64)

    def agreement(self, images, references):
        return np.clip(1.0 - self.distance(images, references), 0.0, 1.0)


class L2Pool(torch.nn.Module):
    """DISTS's replacement for VGG's max pooling: sqrt of a Hann-weighted (3x3) average of
    squares, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.hann_window(5, periodic=False, dtype=torch.float64)[1:-1]
        g = (a[:, None] * a[None, :]) / (a[:, None] * a[None, :]).sum()
        self.register_buffer("filter", g.float()[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x):
        return (F.conv2d(x ** 2, self.filter, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()


class Vgg16Trunk(torch.nn.Module):
    """torchvision's VGG16 ``features`` up to conv5_3 (same module indices, so its state dict
    loads), with DISTS's L2 pooling in place of max pooling; returns the input and the five
    stage outputs DISTS compares."""

    CHANNELS = (3, 64, 128, 256, 512, 512)
    STAGES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))     # module index ranges ending at relu1_2 ... relu5_3

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for i, width in enumerate((64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512)):
            if width == "P":
                layers.append(L2Pool(c))
            else:
                layers += [torch.nn.Conv2d(c, width, 3, padding=1), torch.nn.ReLU()]
                c = width
        self.features = torch.nn.Sequential(*layers)

    def forward(self, x):
        outs = [x]
        h = _normalise(x, _IMAGENET_MEAN, _IMAGENET_STD)
        for a, b in self.STAGES:
            for layer in self.features[a:b]:
                h = layer(h)
            outs.append(h)
        return outs


class DistsMetric(ImageMetric):
    """DISTS similarity (Ding et al. 2020: structure and texture similarity of VGG16 features,
    weighted by its learned alpha / beta), i.e. 1 - DISTS distance."""

    name, kind = "dists", "structure"
    MIN_SIDE = 64
    batch = 8

    def __init__(self, source: str | None = None, device=None, download: bool = True):
        """``download`` is accepted for symmetry: the files are only ever looked up locally."""
        self.device = torch.device(device or "cpu")
        trunk_file, weights_file = _trunk_files("dists", source, VGG16_FILE, "torchvision's VGG16 weights",
                                                DISTS_WEIGHTS_FILE, "DISTS's alpha / beta", "DISTS_pytorch", ())
        self.source = str(trunk_file.parent) if source else f"{trunk_file} + {weights_file}"
        self.trunk = Vgg16Trunk()
        try:
            state = torch.load(trunk_file, map_location="cpu", weights_only=True)
            self.trunk.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")
                                        and int(k.split(".")[1]) < 30})
            w = torch.load(weights_file, map_location="cpu", weights_only=True)
            alpha, beta = w["alpha"].float(), w["beta"].float()
        except Exception as e:  # noqa: BLE001 - a file of another network, named with the reason
            raise StageVarError(f"dists weights {trunk_file}, {weights_file}: not VGG16 / DISTS weights ({e}).") from None
        total = alpha.sum() + beta.sum()
        self.alpha = [a.to(self.device) for a in torch.split(alpha / total, Vgg16Trunk.CHANNELS, dim=1)]
        self.beta = [b.to(self.device) for b in torch.split(beta / total, Vgg16Trunk.CHANNELS, dim=1)]
        self.trunk = self.trunk.eval().to(self.device)


    @torch.inference_mode()
    def similarity(self, images: np.ndarray, references: np.ndarray) -> np.ndarray:
        out = []
        c1 = c2 = 1e-6
        for i in range(0, len(images), self.batch):
            fa = self.trunk(_upsampled(images[i:i + self.batch], self.device, self.MIN_SIDE))
            fb = self.trunk(_upsampled(references[i:i + self.batch], self.device, self.MIN_SIDE))
            s = 0
            for a, b, alpha, beta in zip(fa, fb, self.alpha, self.beta):
                ma, mb = a.mean((2, 3), keepdim=True), b.mean((2, 3), keepdim=True)
                va, vb = ((a - ma) ** 2).mean((2, 3), keepdim=True), ((b - mb) ** 2).mean((2, 3), keepdim=True)
                cov = (a * b).mean((2, 3), keepdim=True) - ma * mb
                s = s + (alpha * (2 * ma * mb + c1) / (ma ** 2 + mb ** 2 + c1)).sum(1) \
                      + (beta * (2 * cov + c2) / (va + vb + c2)).sum(1)
            out.append(s.flatten())
        return torch.cat(out).cpu().numpy().astype(np.float64)

    def agreement(self, images, references):
        return np.clip(self.similarity(images, references), 0.0, 1.0)


#: learned metrics by name
LEARNED = {"clip": ClipMetric, "dino": DinoMetric, "lpips": LpipsMetric, "dists": DistsMetric}
