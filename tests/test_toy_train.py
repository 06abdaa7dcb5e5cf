"""The training script on a tiny config: both phases run, the checkpoint resumes where it stopped,
and the exported weights load as a working model."""
from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from stagevar.errors import StageVarError
from training import cli, data, targets, weights
from training.loop import train
from stagevar.toy.model import load_mini

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = {
    "seed": 0, "image_size": 32, "schedule": [1, 2, 4],
    "vae": {"codebook_dim": 8, "patch_size": 8, "base_ch": 32, "encoder_ch_mult": [1, 1, 1, 1],
            "decoder_ch_mult": [1, 1, 1, 1], "num_res_blocks": 1},
    "text": {"width": 128, "layers": 1, "heads": 2, "max_tokens": 12, "ffn_mult": 1},
    "transformer": {"depth": 1, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2.0},
    "sampling": {"cfg": 3.0, "tau": 1.0, "top_k": 0, "top_p": 0.0},
}


@pytest.fixture()
def arch():
    shipped = yaml.safe_load((Path(cli.__file__).parent / "configs" / "mini.yaml").read_text())
    a = copy.deepcopy(TINY)
    # work bounded by step counts (the minutes are a hang guard only), so every machine does the same
    a["train"] = dict(shipped["train"], max_minutes=60, vae_minutes=60, vae_steps=3, max_steps=8, batch=2, short_batch=2,
                      vae_batch=2, warmup_steps=2, ckpt_minutes=100, log_every=1, bf16=False)
    return a


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_trains_resumes_and_exports(arch, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    final = train(arch, out, max_steps=4, threads=1, quiet=True)
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    st1 = ck["state"]
    assert st1["vae_step"] > 0 and st1["tr_step"] > 0
    phases = {r["phase"] for r in _log(out)}
    assert phases == {"vae", "transformer"}
    # resuming with a longer budget continues the same run: step counters go on, the VAE is not retrained
    train(arch, out, max_steps=8, threads=1, quiet=True)
    st2 = torch.load(out / "ckpt.pt", weights_only=False)["state"]
    assert st2["vae_step"] == st1["vae_step"] and st2["tr_step"] > st1["tr_step"]
    assert st2["elapsed"] > st1["elapsed"]
    steps = [r["step"] for r in _log(out) if r["phase"] == "transformer"]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    # the exported weights (final/ and --export of the checkpoint) build a model that generates
    meta = weights.export_checkpoint(out / "ckpt.pt", tmp_path / "exported")
    assert meta["transformer_steps"] == st2["tr_step"]
    for wdir in (final, tmp_path / "exported"):
        m = load_mini(wdir)
        img = m.reference_generate(m.encode_prompts(["a red circle", "two blue squares"]), guidance=3.0, seed=0)
        assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()


def test_an_interrupted_run_resumes_to_the_same_weights(arch, tmp_path, monkeypatch):
    """Killed after a checkpoint and run again, a run ends with the weights an uninterrupted run
    ends with, bit for bit: the checkpoint holds everything the run depends on (models, optimisers,
    data stream, every random generator, the step counters), the self-sampled prefix included."""
    from training import loop
    torch.set_num_threads(1)
    arch["train"].update(max_steps=6, ckpt_minutes=0, self_prefix_scales=2, self_prefix_prob=0.5, self_prefix_match=2)
    once = train(arch, tmp_path / "once", threads=1, quiet=True)
    step = loop.Trainer._transformer_step

    def killed_at_4(self, i, lr):
        if i == 4:
            raise KeyboardInterrupt
        return step(self, i, lr)

    monkeypatch.setattr(loop.Trainer, "_transformer_step", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(arch, tmp_path / "twice", threads=1, quiet=True)
    assert torch.load(tmp_path / "twice" / "ckpt.pt", weights_only=False)["state"]["tr_step"] == 4
    monkeypatch.setattr(loop.Trainer, "_transformer_step", step)
    twice = train(arch, tmp_path / "twice", threads=1, quiet=True)
    for f in ("transformer.safetensors", "text.safetensors", "vae.safetensors"):
        assert (once / f).read_bytes() == (twice / f).read_bytes(), f
    steps = [r["step"] for r in _log(tmp_path / "twice") if r["phase"] == "transformer"]
    assert steps == list(range(6))                                   # no step done twice or left out


def test_warm_start_grows_the_schedule(arch, tmp_path):
    """--init from weights of a shorter schedule at a smaller image (how infinity-mini-256 starts
    from infinity-mini): the learned scales keep their weights, there is no VAE phase, the record
    says where the weights grew from; a schedule that is not an extension is refused."""
    torch.set_num_threads(1)
    small = train(arch, tmp_path / "small", max_steps=2, threads=1, quiet=True)
    big = dict(copy.deepcopy(arch), image_size=64, schedule=[1, 2, 4, 8])
    big["sampling"] = dict(arch["sampling"])
    grown = train(big, tmp_path / "big", max_steps=1, threads=1, quiet=True, init=small)
    rec = json.loads((grown / "config.json").read_text())
    assert rec["schedule"] == [1, 2, 4, 8] and rec["training"]["vae_steps"] == 0
    assert rec["training"]["init"]["grown_from"] == {"image_size": 32, "schedule": [1, 2, 4]}
    assert (grown / "vae.safetensors").read_bytes() == (small / "vae.safetensors").read_bytes()   # no VAE phase
    m = load_mini(grown)
    img = m.reference_generate(m.encode_prompts(["a red circle"]), guidance=3.0, seed=0)
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    for schedule, size, what in (([1, 4, 8], 64, "neither"), ([1, 2, 4], 64, "image_size")):
        bad = dict(copy.deepcopy(big), schedule=schedule, image_size=size)
        with pytest.raises(StageVarError, match=what):
            train(bad, tmp_path / f"bad{size}{len(schedule)}", max_steps=1, threads=1, quiet=True, init=small)


def test_export_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--export", str(tmp_path / "missing.pt")])            # no --out
    assert cli.main(["--export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "w")]) == 1
    assert re.search(r"no such checkpoint", capsys.readouterr().err)


def test_warm_start_from_weights(arch, tmp_path):
    """--init: training goes on from exported weights (no VAE phase; the VAE stays as it was) and the
    training record names where it started."""
    torch.set_num_threads(1)
    first = train(arch, tmp_path / "a", max_steps=4, threads=1, quiet=True)
    final = train(arch, tmp_path / "b", max_steps=3, threads=1, quiet=True, init=first)
    assert {r["phase"] for r in _log(tmp_path / "b")} == {"transformer"}
    a, b = load_mini(first), load_mini(final)
    for k, v in a.vae.state_dict().items():
        assert torch.equal(v, b.vae.state_dict()[k]), k
    assert any(not torch.equal(v, b.transformer.state_dict()[k]) for k, v in a.transformer.state_dict().items())
    rec = json.loads((final / "config.json").read_text())["training"]
    assert rec["init"]["from"] == str(first) and rec["init"]["training"]["transformer_steps"] > 0
    # a different architecture is refused, naming the section
    other = copy.deepcopy(arch)
    other["transformer"]["depth"] = 2
    with pytest.raises(StageVarError, match="'transformer'"):
        train(other, tmp_path / "c", max_steps=1, threads=1, quiet=True, init=first)


def test_average_of_two_weights_directories(arch, tmp_path, capsys):
    """--average: the transformer and text encoder are the weighted mean of the two inputs (ALPHA the
    weight of the second), the VAE is the shared one, the record names both; mismatches are refused."""
    torch.set_num_threads(1)
    first = train(arch, tmp_path / "a", max_steps=4, threads=1, quiet=True)
    second = train(arch, tmp_path / "b", max_steps=3, threads=1, quiet=True, init=first)
    out = tmp_path / "avg"
    assert cli.main(["--average", str(first), str(second), "0.25", "--out", str(out)]) == 0
    a, b, m = (load_mini(d) for d in (first, second, out))
    for part in ("transformer", "text_encoder"):
        sa, sb, sm = (getattr(x, part).state_dict() for x in (a, b, m))
        changed = 0
        for k, v in sm.items():
            if not v.is_floating_point():
                continue
            want = (0.75 * sa[k] + 0.25 * sb[k]).half().float()        # float16 on disk
            assert torch.allclose(v, want, atol=1e-3, rtol=1e-3), (part, k)
            changed += not torch.equal(sa[k], sb[k])
        assert changed > 0 or part == "text_encoder"
    assert (out / "vae.safetensors").read_bytes() == (first / "vae.safetensors").read_bytes()
    rec = json.loads((out / "config.json").read_text())["training"]["average"]
    assert rec["alpha"] == 0.25 and rec["first"]["from"] == str(first) and rec["second"]["from"] == str(second)
    img = m.reference_generate(m.encode_prompts(["a red circle"]), guidance=3.0, seed=0)
    assert torch.isfinite(img).all()
    # a second directory with another VAE (its bit labels differ) is refused, and so is a bad ALPHA
    other = tmp_path / "other"
    shutil.copytree(second, other)
    vae_sd = load_file(str(other / "vae.safetensors"))
    name = next(k for k, v in vae_sd.items() if v.is_floating_point())
    vae_sd[name] = vae_sd[name] + 1
    save_file(vae_sd, str(other / "vae.safetensors"))
    assert cli.main(["--average", str(first), str(other), "0.5", "--out", str(tmp_path / "x")]) == 1
    assert re.search(r"vae.safetensors", capsys.readouterr().err)
    assert cli.main(["--average", str(first), str(second), "1.5", "--out", str(tmp_path / "x")]) == 1
    assert re.search(r"ALPHA=1.5", capsys.readouterr().err)
    assert cli.main(["--average", str(first), str(tmp_path / "missing"), "0.5", "--out", str(tmp_path / "x")]) == 1
    assert re.search(r"not a weights directory", capsys.readouterr().err)


def test_periodic_evaluation_is_logged_and_recorded(arch, tmp_path):
    """train.eval_steps (and eval_minutes): the EMA weights are judged on calibration prompts during
    training; each result is a log row, and the exported record names the setting."""
    pytest.importorskip("scipy")
    torch.set_num_threads(1)
    arch["train"].update(eval_steps=2, eval_prompts=6)
    final = train(arch, tmp_path / "run", max_steps=4, threads=1, quiet=True)
    rows = [r for r in _log(tmp_path / "run") if r["phase"] == "eval"]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["images"] == 6 and 0.0 <= r["overall"] <= 1.0 and r["split"] == "calibration" for r in rows)
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    rec = json.loads((final / "config.json").read_text())["training"]
    assert rec["eval"] == {"steps": 2, "prompts": 6, "split": "calibration", "log": "log.jsonl"}
    assert rec["transformer_steps"] == 4 and rec["vae_steps"] == 3
    bad = copy.deepcopy(arch)
    bad["train"]["eval_minutes"] = -1
    with pytest.raises(StageVarError, match="train.eval_minutes"):
        train(bad, tmp_path / "bad", max_steps=1, threads=1, quiet=True)


def test_rendering_workers_give_the_same_stream():
    one, pool = data.SceneStream(3, 32), data.SceneStream(3, 32, workers=2)
    try:
        for n in (5, 11):
            (p1, x1), (p2, x2) = one.batch(n), pool.batch(n)
            assert p1 == p2 and torch.equal(x1, x2)
    finally:
        pool.close()


def test_category_weights_reweight_the_stream():
    from collections import Counter

    from stagevar.toy.prompts import CATEGORIES, make_split
    plain = data.SceneStream(5, 32)
    assert [plain._next_item() for _ in range(50)] == make_split("train", data.SceneStream.CHUNK, 5 * 100_003)[:50]
    weighted = data.SceneStream(5, 32, category_weights={"counting": 3})
    items = [weighted._next_item() for _ in range(3000)]
    counts = Counter(it["spec"]["category"] for it in items)
    assert set(counts) == set(CATEGORIES)
    others = [counts[c] for c in CATEGORIES if c != "counting"]
    assert 2.5 < counts["counting"] / (sum(others) / len(others)) < 3.5
    assert len({(it["prompt"], it["seed"]) for it in items}) == len(items)          # distinct items, no repeats
    again = data.SceneStream(5, 32, category_weights={"counting": 3})
    again.load_state(weighted.state())
    weighted2 = data.SceneStream(5, 32, category_weights={"counting": 3})
    [weighted2._next_item() for _ in range(3000)]
    assert [again._next_item() for _ in range(20)] == [weighted2._next_item() for _ in range(20)]   # resumable
    with pytest.raises(StageVarError, match="category_weights: countng"):
        data.SceneStream(5, 32, category_weights={"countng": 2})
    with pytest.raises(StageVarError, match="category_weights: colors"):
        data.SceneStream(5, 32, category_weights={"colors": 0})


def test_config_overrides(arch):
    a = copy.deepcopy(arch)
    cli.apply_override(a, "train.batch=64")
    cli.apply_override(a, "train.lr=3.0e-4")
    assert a["train"]["batch"] == 64 and a["train"]["lr"] == 3.0e-4
    with pytest.raises(StageVarError, match="no key 'train.btch'"):
        cli.apply_override(a, "train.btch=1")
    with pytest.raises(StageVarError, match="no section 'trian'"):
        cli.apply_override(a, "trian.batch=1")
    with pytest.raises(StageVarError, match="KEY=VALUE"):
        cli.apply_override(a, "train.batch")


def test_self_sampled_prefix_relabels_only_the_chosen_rows(arch, tmp_path):
    """teacher_forcing_targets with own_bits: rows outside own_rows keep the plain labels; rows in
    it accumulate the given bits on the first own_scales scales, so their later labels become the
    residual after those bits (own bits equal to the labels change nothing)."""
    from stagevar.toy.model import build_parts
    _, ad = build_parts(arch)
    sched = [tuple(s) for s in ad.cfg.scale_schedule]
    _, img = data.SceneStream(1, 32).batch(4)
    with torch.no_grad():
        feats = ad.vae.encode(img).float()
    plain, x_plain = targets.teacher_forcing_targets(ad.vae, feats, sched, len(sched), 0.0, None)
    offs = [0]
    for _, h, w in sched:
        offs.append(offs[-1] + h * w)

    def labels_of(si):
        return plain[:, offs[si]:offs[si + 1]].reshape(4, 1, *sched[si][1:], -1)

    rows = torch.tensor([True, False, True, False])
    same, _ = targets.teacher_forcing_targets(ad.vae, feats, sched, len(sched), 0.0, None, own_rows=rows, own_scales=2,
                                         own_bits=lambda si, x: labels_of(si))
    assert torch.equal(same, plain)
    seen = []

    def inverted(si, prefix):
        seen.append(prefix.shape[1])
        return 1 - labels_of(si)

    mixed, x_mixed = targets.teacher_forcing_targets(ad.vae, feats, sched, len(sched), 0.0, None, own_rows=rows,
                                                own_scales=1, own_bits=inverted)
    assert seen == [0]                                     # scale 0 sampled from an empty prefix only
    assert torch.equal(mixed[~rows], plain[~rows]) and torch.equal(x_mixed[~rows], x_plain[~rows])
    assert torch.equal(mixed[rows, :offs[1]], plain[rows, :offs[1]])        # scale 0's labels themselves stay
    assert not torch.equal(mixed[rows, offs[1]:], plain[rows, offs[1]:])    # later labels repair the prefix


def test_training_with_self_sampled_prefix_runs_and_is_recorded(arch, tmp_path):
    torch.set_num_threads(1)
    arch["train"].update(self_prefix_scales=2, self_prefix_prob=0.5)
    final = train(arch, tmp_path / "run", max_steps=3, threads=1, quiet=True)
    rec = json.loads((final / "config.json").read_text())["training"]
    assert rec["self_prefix"] == {"scales": 2, "prob": 0.5}
    steps = [r for r in _log(tmp_path / "run") if r.get("phase") == "transformer"]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert sum(r["own_prefix_rows"] for r in steps) > 0                  # some rows did take their own prefix
    arch["train"].update(self_prefix_prob=1.5)
    with pytest.raises(StageVarError, match="self_prefix_prob=1.5"):
        train(arch, tmp_path / "bad", max_steps=1, threads=1, quiet=True)


def test_nearest_scene_picks_the_candidate_closest_to_the_coarse_prefix():
    """The own prefix's accumulated codes are compared with every candidate pooled to the given
    size; the closest wins, even when its fine detail differs (pooling hides it)."""
    torch.manual_seed(0)
    B, K, d, H = 3, 4, 8, 16
    cand = torch.randn(B, K, d, H, H)
    target = torch.tensor([2, 0, 3])
    coarse = torch.nn.functional.adaptive_avg_pool2d(cand[torch.arange(B), target], 4)
    summed = torch.nn.functional.interpolate(coarse, size=(H, H), mode="nearest").unsqueeze(2)
    assert torch.equal(targets.nearest_scene(summed, cand, (4, 4)), target)


def test_alternative_scenes_satisfy_the_prompt_and_are_deterministic():
    from stagevar.toy.evaluate import score
    from stagevar.toy.prompts import make_split
    items = make_split("train", 6, 3)
    a = data.alternative_scenes(items, 3, 64)
    assert a.shape == (18, 3, 64, 64) and torch.equal(a, data.alternative_scenes(items, 3, 64))
    assert not torch.equal(a[0], a[1])                       # other layouts of the same prompt
    imgs = ((a.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert all(score(imgs[i], items[i // 3]["spec"]) for i in range(len(imgs)))


def test_own_prefix_is_the_model_sampling_itself(arch):
    """sample_own_prefix feeds each scale the accumulated codes of the bits it sampled before."""
    from stagevar.models.bsq_vae import accumulate_step, bits_to_codes
    from stagevar.toy.model import build_parts
    _, ad = build_parts(arch)
    sched = [tuple(s) for s in ad.cfg.scale_schedule]
    d = ad.cfg.codebook_dim
    prefixes = []

    def fake(si, prefix):
        prefixes.append(prefix.clone())
        _, h, w = sched[si]
        return torch.full((2, 1, h, w, d), si % 2, dtype=torch.long)

    bits, summed = targets.sample_own_prefix(fake, sched, 2, 2, d, "cpu")
    assert [p.shape[1] for p in prefixes] == [0, sched[1][1] * sched[1][2]]      # scale 1 reads its 2x2 input
    s0, nxt = accumulate_step(None, bits_to_codes(bits[0]), 0, sched)
    assert torch.equal(prefixes[1], nxt)
    assert torch.allclose(summed, accumulate_step(s0, bits_to_codes(bits[1]), 1, sched)[0])


def test_training_with_matched_scenes_runs_and_is_recorded(arch, tmp_path):
    torch.set_num_threads(1)
    arch["train"].update(self_prefix_scales=1, self_prefix_prob=1.0, self_prefix_match=3,
                         self_prefix_categories=["counting", "two_object"])
    final = train(arch, tmp_path / "run", max_steps=3, threads=1, quiet=True)
    rec = json.loads((final / "config.json").read_text())["training"]
    assert rec["self_prefix"] == {"scales": 1, "prob": 1.0, "match": 3, "categories": ["counting", "two_object"]}
    steps = [r for r in _log(tmp_path / "run") if r.get("phase") == "transformer"]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    # every row is drawn for the own prefix (prob 1), matched when its prompt is of a listed category
    assert all(r["own_prefix_rows"] == r.get("matched_rows", 0) for r in steps)
    assert sum(r.get("matched_rows", 0) for r in steps) > 0
    with pytest.raises(StageVarError, match="self_prefix_categories=.*'count'"):
        train({**arch, "train": {**arch["train"], "self_prefix_categories": ["count"]}}, tmp_path / "bad",
                 max_steps=1, threads=1, quiet=True)
    arch["train"].update(self_prefix_prob=0.0)
    with pytest.raises(StageVarError, match="self_prefix_match=3"):
        train(arch, tmp_path / "bad", max_steps=1, threads=1, quiet=True)


@pytest.mark.slow
def test_gpu_training_script_dry_run_on_cpu(tmp_path):
    """benchmarks/train256-gpu.sh end to end on the CPU, two steps: the files it leaves under $OUT
    are the ones a lent machine sends back (at most 8, each under 16 MiB), and the packed weights
    unpack into a directory that loads as infinity-mini-256."""
    import os
    import subprocess
    import tarfile

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), STAGEVAR_TRAIN_DEVICE="cpu", STAGEVAR_TRAIN_WORKERS="0",
               STAGEVAR_TRAIN_EVAL_N="2", STAGEVAR_TRAIN_EXTRA="--max-steps 2 --set train.batch=1 --set train.short_batch=1")
    res = subprocess.run(["bash", "benchmarks/train256-gpu.sh"], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stdout + res.stderr
    files = sorted(p.name for p in out.iterdir())
    assert {"train.log", "log.jsonl", "eval.log", "heldout.jsonl", "weights.tar.part-aa"} <= set(files)
    assert len(files) <= 8 and all(p.is_file() and p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    assert json.loads((out / "heldout.jsonl").read_text().splitlines()[-1])["num_images"] == 4
    packed = tmp_path / "weights.tar"
    packed.write_bytes(b"".join(p.read_bytes() for p in sorted(out.glob("weights.tar.part-*"))))
    with tarfile.open(packed) as tar:
        tar.extractall(tmp_path / "weights", filter="data")
    from stagevar.models.registry import load_model
    m = load_model("infinity-mini-256", weights=tmp_path / "weights")
    assert m.image_size == (256, 256)
