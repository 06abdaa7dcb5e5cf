"""Official weights found in the local Hugging Face cache (``--weights hf``, or no ``--weights`` and
no ``$STAGEVAR_WEIGHTS``), on a cache laid out the way ``huggingface_hub`` writes it, in a
temporary directory: nothing is downloaded."""
from __future__ import annotations

import os

import pytest
import torch

from stagevar.models.catalog import WeightsError
from stagevar.models.hub import weights_from_hub_cache
from stagevar.models.registry import load_model


def _snapshot(cache, repo: str, revision: str, files: dict[str, bytes], main: bool = True):
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / revision
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
    if main:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(revision)
    return snap


def test_var_files_are_linked_from_the_revision_main_names(tmp_path):
    _snapshot(tmp_path, "FoundationVision/var", "old", {"var_d16.pth": b"old", "vae_ch160v4096z32.pth": b"old"}, main=False)
    new = _snapshot(tmp_path, "FoundationVision/var", "new", {"var_d16.pth": b"new", "vae_ch160v4096z32.pth": b"vae"})
    os.utime(tmp_path / "models--FoundationVision--var" / "snapshots" / "old")      # the newest, but not main's
    view = weights_from_hub_cache("var-d16", tmp_path)
    assert sorted(p.name for p in view.iterdir()) == ["vae_ch160v4096z32.pth", "var_d16.pth"]
    assert (view / "var_d16.pth").resolve() == (new / "var_d16.pth").resolve()
    assert (view / "var_d16.pth").read_bytes() == b"new"


def test_infinity_files_and_the_text_encoder_snapshot_are_gathered_under_the_loader_names(tmp_path):
    inf = _snapshot(tmp_path, "FoundationVision/Infinity", "r1",
                    {"infinity_2b_reg.pth": b"t", "infinity_vae_d32reg.pth": b"v"})     # the hub's file name
    t5 = _snapshot(tmp_path, "google/flan-t5-xl", "r2", {"config.json": b"{}", "spiece.model": b"s"})
    view = weights_from_hub_cache("infinity-2b", tmp_path)
    assert (view / "infinity_vae_d32_reg.pth").resolve() == (inf / "infinity_vae_d32reg.pth").resolve()
    assert (view / "flan-t5-xl").is_dir() and (view / "flan-t5-xl").resolve() == t5.resolve()
    assert (view / "flan-t5-xl" / "spiece.model").read_bytes() == b"s"


def test_missing_files_are_one_error_naming_repository_file_and_cache(tmp_path):
    _snapshot(tmp_path, "FoundationVision/Infinity", "r1", {"infinity_2b_reg.pth": b"t"})
    with pytest.raises(WeightsError) as e:
        weights_from_hub_cache("infinity-2b", tmp_path)
    msg = str(e.value)
    assert "FoundationVision/Infinity: infinity_vae_d32reg.pth or infinity_vae_d32_reg.pth" in msg and "--random-weights" in msg
    assert "google/flan-t5-xl" in msg and str(tmp_path) in msg and "--weights DIR" in msg
    assert "infinity_2b_reg.pth" not in msg.split("missing")[1]                     # the one found is not listed
    with pytest.raises(WeightsError, match="no Hugging Face files are known for model 'infinity-tiny'"):
        weights_from_hub_cache("infinity-tiny", tmp_path)


def test_load_model_reads_the_cached_checkpoint(tmp_path, monkeypatch):
    """``--weights hf`` (and no weights given at all) reach the checkpoint in the cache: a file of
    the wrong model there is reported by the loader, naming what it read."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("STAGEVAR_WEIGHTS", raising=False)
    buf = tmp_path / "wrong.pth"
    torch.save({"not_a_var_key": torch.zeros(1)}, buf)
    _snapshot(tmp_path, "FoundationVision/var", "r", {"var_d16.pth": buf.read_bytes(), "vae_ch160v4096z32.pth": buf.read_bytes()})
    for weights in ("hf", None):
        with pytest.raises(WeightsError) as e:
            load_model("var-d16", weights)
        assert "var_d16.pth" in str(e.value) and "not_a_var_key" in str(e.value), str(e.value)


def test_cli_without_weights_or_cache_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from stagevar.cli import main
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("STAGEVAR_WEIGHTS", raising=False)
    rc = main(["generate", "--model", "var-d16", "--prompt", "goldfish", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "not in the Hugging Face cache" in err and "FoundationVision/var: var_d16.pth" in err and "--weights DIR" in err
    assert not (tmp_path / "x.png").exists()
