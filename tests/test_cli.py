"""The ``stagevar`` command, run in-process through :func:`stagevar.cli.main` (plus one subprocess
call proving the console script is installed).

Exit codes: 0 ok, 1 error (one paragraph on stderr, no traceback unless ``--debug``), 2 usage.
``evaluate`` is covered elsewhere (only its ``--help`` is checked here).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stagevar.cli import main
from stagevar.errors import StageVarError
from stagevar.io import read_png
from stagevar.models.registry import load_model
from stagevar.policy import OperatingPoint, Policy, PolicyError, ScalePlan, default_stages

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUBCOMMANDS = ["generate", "validate", "inspect", "list-models", "check-reference", "evaluate"]


from refdata import REFERENCE, need  # noqa: E402


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); argparse's SystemExit is turned into its code."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_paragraph_error(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    text = err.strip()
    assert text.startswith("error:"), err
    assert "\n\n" not in text and text.count("\n") == 0, err
    for w in words:
        assert w in text, (w, err)


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny():
    return load_model("infinity-tiny")


@pytest.fixture(scope="module")
def policy_files(tiny, tmp_path_factory):
    """good.yaml: an accelerated policy for infinity-tiny (points 2x, 3x); other_model.yaml: valid,
    but made for another model; malformed.yaml: a typo in a plan key."""
    d = tmp_path_factory.mktemp("policies")
    base = Policy.identity(tiny)
    n = len(tiny.scale_schedule)
    ident = list(base.operating_point().plans)
    p2 = OperatingPoint(default_stages(n, 5), tuple(ident[:5]) + (
        ScalePlan(5, guidance="cond_only"),
        ScalePlan(6, guidance="cond_only", keep=0.5, selection="uniform", layers=(1, 2)),
    ), measured={"speedup": 1.7})
    p3 = OperatingPoint(default_stages(n, 4), tuple(ident[:4]) + (
        ScalePlan(4, guidance="cond_only", keep=0.5),
        ScalePlan(5, guidance="cond_only", keep_tokens=30, selection="deviation", restore="cached_output"),
        ScalePlan(6, guidance="cond_only", skip=True),
    ))
    good = dataclasses.replace(base, operating_points={"2x": p2, "3x": p3}, default="3x")
    other = dataclasses.replace(base, model=dataclasses.replace(base.model, name="some-other-model"))
    paths = {"good": good.save(d / "good.yaml"), "other": other.save(d / "other_model.yaml")}
    bad = good.to_dict()
    plan = bad["operating_points"]["2x"]["plans"][6]
    plan["kep"] = plan.pop("keep")                    # a typo a user could make
    paths["malformed"] = d / "malformed.yaml"
    paths["malformed"].write_text(yaml.safe_dump(bad, sort_keys=False), encoding="utf-8")
    return paths


def check_png(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE
    assert raw[12:16] == b"IHDR"
    assert struct.unpack(">II", raw[16:24]) == (256, 256)
    img = read_png(path)
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    return img


# ------------------------------------------------------------------------------------- help / usage
def test_console_script_installed():
    exe = Path(sys.executable).parent / "stagevar"
    cmd = str(exe) if exe.exists() else shutil.which("stagevar")
    assert cmd, "the 'stagevar' console script is not installed (pip install -e .)"
    res = subprocess.run([cmd, "--help"], capture_output=True, text=True, timeout=600)      # a hang guard
    assert res.returncode == 0, res.stderr
    assert "example" in res.stdout
    for sub in SUBCOMMANDS:
        assert sub in res.stdout


def test_main_help(capsys):
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0 and "example" in out


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help(capsys, sub):
    rc, out, err = run_cli(capsys, sub, "--help")
    assert rc == 0, err
    assert "example" in out
    assert f"stagevar {sub}" in out


@pytest.mark.parametrize("argv", [
    ["--no-such-flag"],
    ["generate", "--prompt", "x", "--no-such-flag"],
    ["no-such-command"],
    ["validate"],                                     # missing positional
    ["generate", "--seed", "abc", "--prompt", "x"],   # wrong type
    ["generate", "--dtype", "float64", "--prompt", "x"],
    ["check-reference", "somewhere", "--family", "dalle"],
])
def test_usage_errors_exit_2(capsys, argv):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert "usage:" in err and "error:" in err
    assert "Traceback" not in err


def test_no_command_prints_help_exit_2(capsys):
    rc, out, _ = run_cli(capsys)
    assert rc == 2 and "usage:" in out


# ------------------------------------------------------------------------------------- generate
def test_generate_png(capsys, tmp_path):
    out_png = tmp_path / "a.png"
    rc, out, err = run_cli(capsys, "generate", "--model", "infinity-tiny", "--prompt", "a red circle",
                           "--out", str(out_png))
    assert rc == 0, err
    assert out.strip() == str(out_png)
    img = check_png(out_png)
    assert img.std() > 0                    # not a blank image
    # no stray temp files next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_generate_with_policy_and_operating_point(capsys, tmp_path, policy_files, tiny):
    out_dir = tmp_path / "out"
    rc, out, err = run_cli(capsys, "generate", "--model", "infinity-tiny", "--prompt", "a red circle",
                           "--policy", str(policy_files["good"]), "--operating-point", "2x", "--out", str(out_dir))
    assert rc == 0, err
    expected = out_dir / "000_a_red_circle.png"  # --out without .png is a directory
    assert out.strip() == str(expected)
    accelerated = check_png(expected)
    # the policy was really applied: the unaccelerated sampler (same seed) gives another image
    from stagevar.runtime import Runtime
    ref = Runtime(tiny).generate(["a red circle"], seed=0).images
    ref = (ref.float().clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert not np.array_equal(accelerated, ref)


def test_generate_unknown_operating_point(capsys, tmp_path, policy_files):
    rc, _, err = run_cli(capsys, "generate", "--model", "infinity-tiny", "--prompt", "x", "--policy",
                         str(policy_files["good"]), "--operating-point", "9x", "--out", str(tmp_path / "x.png"))
    assert rc == 1
    assert_one_paragraph_error(err, "9x", "2x", "3x")
    assert not (tmp_path / "x.png").exists()


def test_generate_policy_for_other_model(capsys, tmp_path, policy_files):
    rc, _, err = run_cli(capsys, "generate", "--model", "infinity-tiny", "--prompt", "x", "--policy",
                         str(policy_files["other"]), "--out", str(tmp_path / "x.png"))
    assert rc == 1
    assert_one_paragraph_error(err, "model.name", "some-other-model")


def test_generate_per_scale_guidance(capsys, tmp_path, tiny):
    n = len(tiny.scale_schedule)
    per_scale = ",".join(["1"] * 2 + ["4"] * (n - 2))
    rc, out, err = run_cli(capsys, "generate", "--model", "infinity-tiny", "--prompt", "a red circle",
                           "--guidance", per_scale, "--out", str(tmp_path / "a.png"))
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "generate", "--model", "infinity-tiny", "--prompt", "a red circle",
                         "--guidance", "1,4", "--out", str(tmp_path / "b.png"))
    assert rc == 1
    assert_one_paragraph_error(err, "guidance", "2 values", f"{n} scales")
    assert not (tmp_path / "b.png").exists()


def test_generate_without_prompt(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "generate", "--model", "infinity-tiny", "--out", str(tmp_path / "x.png"))
    assert rc == 1
    assert_one_paragraph_error(err, "--prompt")


def test_generate_missing_prompts_file(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "generate", "--model", "infinity-tiny", "--prompts", str(tmp_path / "none.txt"))
    assert rc == 1
    assert_one_paragraph_error(err, "none.txt")


def test_generate_operating_point_needs_policy(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "generate", "--model", "infinity-tiny", "--prompt", "x", "--operating-point", "2x",
                         "--out", str(tmp_path / "x.png"))
    assert rc == 1
    assert_one_paragraph_error(err, "--policy")


def test_generate_unknown_model(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "generate", "--model", "no-such-model", "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert rc == 1
    assert_one_paragraph_error(err, "no-such-model", "infinity-tiny")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_generate_cuda_on_cpu_machine(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "generate", "--model", "infinity-tiny", "--prompt", "x", "--device", "cuda",
                         "--out", str(tmp_path / "x.png"))
    assert rc == 1
    assert_one_paragraph_error(err, "cuda")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_debug_reraises_device_error(capsys, tmp_path):
    with pytest.raises(StageVarError, match="cuda"):
        main(["--debug", "generate", "--model", "infinity-tiny", "--prompt", "x", "--device", "cuda",
              "--out", str(tmp_path / "x.png")])


def test_debug_reraises_policy_error(capsys, tmp_path, policy_files):
    with pytest.raises(PolicyError, match="kep"):
        main(["--debug", "validate", str(policy_files["malformed"])])
    with pytest.raises(PolicyError, match="not found"):
        main(["--debug", "inspect", str(tmp_path / "missing.yaml")])


# ------------------------------------------------------------------------------------- validate / inspect
def test_validate_good(capsys, policy_files):
    rc, out, err = run_cli(capsys, "validate", str(policy_files["good"]))
    assert rc == 0, err
    assert "valid" in out and "3x (default)" in out and "2x" in out


def test_validate_good_against_model(capsys, policy_files):
    rc, out, err = run_cli(capsys, "validate", str(policy_files["good"]), "--model", "infinity-tiny")
    assert rc == 0, err
    assert "valid" in out


def test_validate_malformed(capsys, policy_files):
    rc, out, err = run_cli(capsys, "validate", str(policy_files["malformed"]))
    assert rc == 1
    assert out == ""
    assert_one_paragraph_error(err, str(policy_files["malformed"]), "operating_points.2x.plans[6].kep")


def test_validate_missing_file(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "validate", str(tmp_path / "missing.yaml"))
    assert rc == 1
    assert_one_paragraph_error(err, "missing.yaml", "not found")


def test_validate_policy_for_other_model(capsys, policy_files):
    rc, _, err = run_cli(capsys, "validate", str(policy_files["other"]))
    assert rc == 0, err                                # the file itself is valid
    rc, out, err = run_cli(capsys, "validate", str(policy_files["other"]), "--model", "infinity-tiny")
    assert rc == 1
    assert out == ""
    assert_one_paragraph_error(err, "model.name", "some-other-model", "infinity-tiny")


def test_inspect(capsys, policy_files, tiny):
    rc, out, err = run_cli(capsys, "inspect", str(policy_files["good"]))
    assert rc == 0, err
    assert "infinity-tiny" in out and "2 layers" in out and "7 scales" in out
    assert "operating point 2x" in out and "operating point 3x  (default)" in out
    assert "skipped" in out
    lines = out.splitlines()
    headers = [ln for ln in lines if ln.split()[:3] == ["scale", "h", "x"]]
    assert len(headers) == 2 and "tokens" in headers[0]
    # one row per scale per point: "<k> <h>x<w> <tokens> ..."
    for k, (t, h, w) in enumerate(tiny.scale_schedule):
        rows = [ln.split() for ln in lines if ln.split()[:3] == [str(k), f"{h}x{w}", str(t * h * w)]]
        assert len(rows) == 2, (k, out)
    row6 = [ln.split() for ln in lines if ln.split()[:2] == ["6", "16x16"]]
    assert ["6", "16x16", "256", "refinement", "cond_only", "128", "uniform", "cached_update", "1-1"] in row6
    assert any(r[-1] == "skipped" for r in row6)          # 3x skips the last scale
    assert "measured: speedup=1.7" in out
    assert "provenance" in out and "tool_version" in out


def test_inspect_one_operating_point(capsys, policy_files):
    rc, out, err = run_cli(capsys, "inspect", str(policy_files["good"]), "--operating-point", "2x")
    assert rc == 0, err
    assert "operating point 2x" in out and "operating point 3x" not in out


def test_inspect_unknown_operating_point(capsys, policy_files):
    rc, _, err = run_cli(capsys, "inspect", str(policy_files["good"]), "--operating-point", "9x")
    assert rc == 1
    assert_one_paragraph_error(err, "9x")


def test_inspect_malformed(capsys, policy_files):
    rc, out, err = run_cli(capsys, "inspect", str(policy_files["malformed"]))
    assert rc == 1
    assert_one_paragraph_error(err, "kep")


# ------------------------------------------------------------------------------------- list-models
def test_list_models(capsys):
    rc, out, err = run_cli(capsys, "list-models")
    assert rc == 0, err
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "infinity-tiny" in rows and "no weights" in rows["infinity-tiny"]
    rc, out, err = run_cli(capsys, "list-models", "--json")
    assert rc == 0, err
    entries = {e["name"]: e for e in json.loads(out)}
    assert entries["infinity-tiny"]["family"] == "infinity" and entries["infinity-tiny"]["needs_weights"] is False


# ------------------------------------------------------------------------------------- check-reference
def test_check_reference_infinity(capsys):
    need(REFERENCE / "infinity" / "golden" / "golden_meta.json")
    threads = torch.get_num_threads()
    try:
        rc, out, err = run_cli(capsys, "check-reference", str(REFERENCE), "--family", "infinity")
    finally:
        torch.set_num_threads(threads)              # the command sets the process-wide thread count
    assert rc == 0, out + err
    assert "0 failed" in out
    assert "FAIL" not in out
    assert all(ln.startswith("infinity") for ln in out.splitlines()[1:-1])


def test_check_reference_empty_dir(capsys, tmp_path):
    threads = torch.get_num_threads()
    try:
        rc, out, err = run_cli(capsys, "check-reference", str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert rc == 1
    assert_one_paragraph_error(err, str(tmp_path), "not a reference directory", "golden_meta.json")
