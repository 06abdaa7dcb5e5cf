"""Bad inputs to both commands: every case exits 1 (error) or 2 (usage) with one clear paragraph on
stderr (no traceback) and writes nothing half-way.

Policy files, command-line arguments of ``stagevar`` and ``stagevar-calibrate`` (and its
``worker``), budgets, prompt files (empty, binary, NUL bytes, > 10 MB), weights (missing
directory, truncated checkpoint, another model's state dict, a pickle that runs code), storage
URLs (unreachable server, wrong password, malformed) and an unavailable device. All in-process
(``main([...])`` + capsys). Measuring, generating and building a full-size model are forbidden in
every case (they raise), so a case that would reach them fails fast instead of hanging.

Cases marked ``xfail(strict=True)`` are known bugs outside this test's files (see the reasons);
when they are fixed the marker must go.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pg import free_port, postgres  # noqa: F401 - fixture

NO_CUDA = not torch.cuda.is_available()
TINY = ["--model", "infinity-tiny"]
M256 = ["--model", "infinity-mini-256"]
CAL = ["--budget", "2x", "--num-prompts", "2", "--batch-size", "2", "--num-heldout", "2", "--num-report", "2", "--trials", "2", "--quiet"]
SECRET = "pw-not-shown-42"


class Forbidden(BaseException):
    """Raised where a bad input must never get to (BaseException: no handler swallows it)."""


def _evil_side_effect(path):
    Path(path).write_text("code ran")


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_evil_side_effect, (self.path,))


# ------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    """Input files, made once: policies, prompt files, weight directories."""
    from stagevar.models.registry import load_model
    from stagevar.policy import Policy

    d = tmp_path_factory.mktemp("inputs")
    tiny = load_model("infinity-tiny")
    good = Policy.identity(tiny)
    f = {}
    f["policy_good"] = good.save(d / "good.yaml")
    f["policy_other_model"] = dataclasses.replace(good, model=dataclasses.replace(good.model, name="another-model")).save(d / "other.yaml")
    (d / "empty.yaml").write_text("")
    f["policy_empty"] = d / "empty.yaml"
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 8)
    f["policy_binary"] = d / "binary.yaml"
    text = f["policy_good"].read_text()
    (d / "nul.yaml").write_text(text.replace("model:", "mo\x00del:", 1))
    f["policy_nul"] = d / "nul.yaml"
    (d / "dup.yaml").write_text(text + "model: again\n")
    f["policy_duplicate_key"] = d / "dup.yaml"
    newer = yaml.safe_load(text)
    newer["schema_version"] = 999
    (d / "newer.yaml").write_text(yaml.safe_dump(newer))
    f["policy_newer_schema"] = d / "newer.yaml"
    (d / "list.yaml").write_text("- just\n- a list\n")
    f["policy_not_mapping"] = d / "list.yaml"
    # prompt files
    (d / "p_typo.txt").write_text("a red circle\na red circel\n")
    f["prompts_typo"] = d / "p_typo.txt"
    (d / "p_empty.txt").write_text("")
    (d / "p_binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)
    (d / "p_nul.txt").write_text("a red circle\x00two blue squares\n")
    with open(d / "p_huge.txt", "w") as fh:                          # 10.5 MB of valid prompts
        line = "a red circle left of a blue square " * 3 + "\n"
        fh.write(line * (10_500_000 // len(line) + 1))
    for k in ("empty", "binary", "nul", "huge"):
        f[f"prompts_{k}"] = d / f"p_{k}.txt"
    # weights for var-d16 (both files must exist for the loader to read the first)
    for name in ("truncated", "wrong_model", "malicious"):
        (d / name).mkdir()
        torch.save({"x": torch.zeros(4)}, d / name / "vae_ch160v4096z32.pth")
    full = d / "full.pth"
    torch.save({f"w{i}": torch.randn(64, 64) for i in range(8)}, full)
    (d / "truncated" / "var_d16.pth").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    torch.save(tiny.transformer.state_dict(), d / "wrong_model" / "var_d16.pth")
    f["side_effect"] = d / "PWNED"
    with open(d / "malicious" / "var_d16.pth", "wb") as fh:
        pickle.dump({"w": Evil(str(f["side_effect"]))}, fh)          # a plain (legacy) pickle
    torch.save({"w": Evil(str(f["side_effect"]))}, d / "malicious" / "zip.pth")   # and the zip format
    (d / "malicious_zip").mkdir()
    shutil.copy(d / "malicious" / "zip.pth", d / "malicious_zip" / "var_d16.pth")
    shutil.copy(d / "malicious" / "vae_ch160v4096z32.pth", d / "malicious_zip" / "vae_ch160v4096z32.pth")
    for name in ("truncated", "wrong_model", "malicious", "malicious_zip"):
        f[f"weights_{name}"] = d / name
    f["weights_missing"] = d / "no-such-dir"
    repo = Path(__file__).resolve().parents[1]
    f["mini_weights"] = repo / "stagevar" / "toy" / "weights"               # infinity-mini's (128px)
    f["mini_policy"] = repo / "policies" / "infinity-mini.128.2x-3x-4x.yaml"
    return f


@pytest.fixture(autouse=True)
def _forbid_expensive_paths(monkeypatch):
    """No case may measure a calibration record, generate an image or materialise a full-size VAR
    model: every bad input must be rejected before."""
    import calibrate.calibration as calibration
    import stagevar.models.var as var
    import stagevar.runtime as runtime

    def forbidden(what):
        def f(*a, **k):
            raise Forbidden(f"{what} before rejecting the bad input")
        return f

    monkeypatch.setattr(runtime.Runtime, "generate", forbidden("generated images"))
    monkeypatch.setattr(calibration, "measure", forbidden("started measuring the calibration record"))
    monkeypatch.setattr(var, "materialize", forbidden("built the full-size model"))


# ------------------------------------------------------------------------------------- cases
S, C = "stagevar", "calibrate"


def case(id_, cli, argv, rc, *words, bug=None, needs=None):
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    if needs == "no_cuda":
        marks.append(pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"))
    return pytest.param(cli, argv, rc, words, needs, id=id_, marks=marks)


CASES = [
    # --- policy files
    case("policy-empty", S, ["validate", "{policy_empty}"], 1, "empty"),
    case("policy-binary", S, ["validate", "{policy_binary}"], 1, "UTF-8"),
    case("policy-nul-bytes", S, ["inspect", "{policy_nul}"], 1, "YAML"),
    case("policy-duplicate-key", S, ["validate", "{policy_duplicate_key}"], 1, "duplicate"),
    case("policy-newer-schema", S, ["validate", "{policy_newer_schema}"], 1, "schema_version", "999"),
    case("policy-not-a-mapping", S, ["validate", "{policy_not_mapping}"], 1),
    case("policy-missing-file", S, ["inspect", "{work}/nope.yaml"], 1, "not found"),
    case("policy-other-model", S, ["generate", *TINY, "--prompt", "x", "--policy", "{policy_other_model}",
                                   "--out", "{work}/x.png"], 1, "another-model"),
    case("policy-unknown-operating-point", S, ["generate", *TINY, "--prompt", "x", "--policy", "{policy_good}",
                                               "--operating-point", "9x", "--out", "{work}/x.png"], 1, "9x"),
    # --- stagevar arguments
    case("stagevar-unknown-command", S, ["frobnicate"], 2),
    case("stagevar-seed-not-int", S, ["generate", *TINY, "--prompt", "x", "--seed", "abc", "--out", "{work}/x.png"], 2, "--seed"),
    case("stagevar-bad-dtype", S, ["generate", *TINY, "--prompt", "x", "--dtype", "float64", "--out", "{work}/x.png"], 2, "float64"),
    case("stagevar-batch-size-0", S, ["generate", *TINY, "--prompt", "x", "--batch-size", "0", "--out", "{work}/x.png"], 1, "batch-size"),
    case("stagevar-op-without-policy", S, ["generate", *TINY, "--prompt", "x", "--operating-point", "2x",
                                           "--out", "{work}/x.png"], 1, "--policy"),
    case("stagevar-unknown-model", S, ["generate", "--model", "nope", "--prompt", "x", "--out", "{work}/x.png"], 1, "nope"),
    case("stagevar-png-for-several-prompts", S, ["generate", *TINY, "--prompt", "x", "--prompt", "y", "--out", "{work}/x.png"],
         1, ".png", "2 prompts"),
    # --- the 256px embedded model: the same errors as infinity-mini's
    case("mini256-unknown-word", S, ["generate", *M256, "--prompt", "a red circle", "--prompt", "a red circel",
                                     "--out", "{work}/o"], 1, "circel"),
    case("mini256-guidance-of-128", S, ["generate", *M256, "--prompt", "a red circle", "--guidance", "1,1,3,3,3,3,3,3,3,3",
                                        "--out", "{work}/x.png"], 1, "13 scales"),
    case("mini256-policy-of-128", S, ["generate", *M256, "--prompt", "a red circle", "--policy", "{mini_policy}",
                                      "--out", "{work}/x.png"], 1, "infinity-mini-256"),
    case("mini256-weights-of-128", S, ["generate", *M256, "--weights", "{mini_weights}", "--prompt", "a red circle",
                                       "--out", "{work}/x.png"], 1, "image_size 128"),
    case("mini256-calibrate-unknown-word", C, [*M256, *CAL, "--prompts", "{prompts_typo}", "--out", "{work}/cal"], 1, "circel"),
    # --- prompt files
    case("stagevar-prompts-empty", S, ["generate", *TINY, "--prompts", "{prompts_empty}", "--out", "{work}/o"], 1, "prompt"),
    case("stagevar-prompts-binary", S, ["generate", *TINY, "--prompts", "{prompts_binary}", "--out", "{work}/o"], 1, "UTF-8"),
    case("stagevar-prompts-nul", S, ["generate", *TINY, "--prompts", "{prompts_nul}", "--out", "{work}/o"], 1, "NUL"),
    case("stagevar-prompts-huge", S, ["generate", *TINY, "--prompts", "{prompts_huge}", "--out", "{work}/o"], 1, "MB"),
    case("calibrate-prompts-empty", C, [*TINY, *CAL, "--prompts", "{prompts_empty}", "--out", "{work}/cal"], 1, "no prompts"),
    case("calibrate-prompts-binary", C, [*TINY, *CAL, "--prompts", "{prompts_binary}", "--out", "{work}/cal"], 1, "UTF-8"),
    case("calibrate-prompts-nul", C, [*TINY, *CAL, "--prompts", "{prompts_nul}", "--out", "{work}/cal"], 1, "NUL"),
    case("calibrate-prompts-huge", C, [*TINY, *CAL, "--prompts", "{prompts_huge}", "--out", "{work}/cal"], 1, "MB"),
    case("calibrate-heldout-empty", C, [*TINY, *CAL, "--heldout-prompts", "{prompts_empty}", "--out", "{work}/cal"], 1, "no prompts"),
    case("measure-prompts-nul", C, ["measure", *TINY, "--prompts", "{prompts_nul}", "--out", "{work}/cal"], 1, "NUL"),
    # --- budgets
    case("budget-0x", C, [*TINY, *CAL, "--budget=0x", "--out", "{work}/cal"], 2, "budget"),
    case("budget-minus-3x", C, [*TINY, *CAL, "--budget=-3x", "--out", "{work}/cal"], 2, "budget"),
    case("budget-3", C, [*TINY, *CAL, "--budget", "3", "--out", "{work}/cal"], 2, "budget"),
    case("budget-fastest", C, [*TINY, *CAL, "--budget", "fastest", "--out", "{work}/cal"], 2, "budget"),
    case("budget-missing", C, [*TINY, "--out", "{work}/cal"], 2, "--budget"),
    case("worker-budget-list-repeats", C, ["worker", *TINY, "--budget", "2x,3x,2x", "--storage", "sqlite:///{work}/s.db"], 2,
         "repeats a budget"),
    case("worker-budget-fastest", C, ["worker", *TINY, "--budget", "fastest", "--storage", "sqlite:///{work}/s.db"], 2, "budget"),
    # --- calibrate arguments
    case("calibrate-unknown-command", C, ["frobnicate"], 2, "frobnicate"),
    case("calibrate-trials-0", C, [*TINY, *CAL, "--trials", "0", "--out", "{work}/cal"], 1, "--trials"),
    case("calibrate-local-trials-negative", C, [*TINY, *CAL, "--local-trials", "-1", "--out", "{work}/cal"], 1, "--local-trials"),
    case("calibrate-latency-margin-1", C, [*TINY, *CAL, "--latency-margin", "1", "--out", "{work}/cal"], 1, "--latency-margin"),
    case("calibrate-verify-repeats-0", C, [*TINY, *CAL, "--verify-repeats", "0", "--out", "{work}/cal"], 1, "--verify-repeats"),
    case("calibrate-batch-size-0", C, [*TINY, *CAL, "--batch-size", "0", "--out", "{work}/cal"], 1, "--batch-size"),
    case("calibrate-num-report-negative", C, [*TINY, *CAL, "--num-report", "-1", "--out", "{work}/cal"], 1, "--num-report"),
    case("calibrate-prompt-draw-negative", C, [*TINY, *CAL, "--prompt-draw", "-2", "--out", "{work}/cal"], 1, "--prompt-draw"),
    case("calibrate-report-prompts-empty", C, [*TINY, *CAL, "--report-prompts", "{prompts_empty}", "--out", "{work}/cal"], 1,
         "no prompts"),
    case("calibrate-bad-seeds", C, [*TINY, *CAL, "--seeds", "a,b", "--out", "{work}/cal"], 1, "--seeds"),
    case("calibrate-unknown-model", C, ["--model", "nope", *CAL, "--out", "{work}/cal"], 1, "nope"),
    case("measure-unknown-option", C, ["measure", *TINY, "--budget", "2x"], 2, "--budget"),
    case("worker-missing-storage", C, ["worker", *TINY, "--budget", "2x"], 2, "--storage"),
    case("worker-n-workers-0", C, ["worker", *TINY, "--budget", "2x", "--n-workers", "0", "--storage", "sqlite:///{work}/s.db"],
         1, "--n-workers"),
    case("worker-grace-shorter-than-heartbeat", C, ["worker", *TINY, "--budget", "2x", "--heartbeat", "10", "--grace-period", "5",
                                                    "--storage", "sqlite:///{work}/s.db"], 1, "--grace-period"),
    case("worker-record-missing", C, ["worker", *TINY, "--budget", "2x", "--record", "{work}/nope",
                                      "--storage", "sqlite:///{work}/s.db"], 1, "record"),
    # --- weights
    case("weights-missing-dir", S, ["generate", "--model", "var-d16", "--weights", "{weights_missing}", "--prompt", "1",
                                    "--out", "{work}/x.png"], 1, "var_d16"),
    case("weights-truncated", S, ["generate", "--model", "var-d16", "--weights", "{weights_truncated}", "--prompt", "1",
                                  "--out", "{work}/x.png"], 1, "var_d16.pth"),
    case("weights-wrong-model", S, ["generate", "--model", "var-d16", "--weights", "{weights_wrong_model}", "--prompt", "1",
                                    "--out", "{work}/x.png"], 1, "var_d16.pth"),
    case("weights-malicious-pickle", S, ["generate", "--model", "var-d16", "--weights", "{weights_malicious}", "--prompt", "1",
                                         "--out", "{work}/x.png"], 1, "var_d16.pth"),
    case("weights-malicious-zip-pickle", S, ["generate", "--model", "var-d16", "--weights", "{weights_malicious_zip}",
                                             "--prompt", "1", "--out", "{work}/x.png"], 1, "var_d16.pth", "weights_only"),
    case("calibrate-weights-truncated", C, ["--model", "var-d16", "--weights", "{weights_truncated}", *CAL,
                                            "--out", "{work}/cal"], 1, "var_d16.pth"),
    case("calibrate-weights-missing-dir", C, ["measure", "--model", "var-d16", "--weights", "{weights_missing}",
                                              "--out", "{work}/cal"], 1, "var_d16"),
    # --- device
    case("stagevar-device-cuda", S, ["generate", *TINY, "--prompt", "x", "--device", "cuda", "--out", "{work}/x.png"], 1, "cuda",
         needs="no_cuda"),
    case("calibrate-device-cuda", C, [*TINY, *CAL, "--device", "cuda", "--out", "{work}/cal"], 1, "cuda", needs="no_cuda"),
    case("stagevar-device-bogus", S, ["generate", *TINY, "--prompt", "x", "--device", "tpu:7", "--out", "{work}/x.png"], 1, "tpu"),
    # --- storage URLs (worker: checked before anything is loaded or measured)
    case("worker-storage-unreachable", C, ["worker", *TINY, "--budget", "2x", "--storage",
                                           "postgresql://me:" + SECRET + "@127.0.0.1:{free_port}/db", "--out", "{work}/cal"],
         1, "127.0.0.1", "***"),
    case("worker-storage-wrong-password", C, ["worker", *TINY, "--budget", "2x", "--storage", "{pg_wrong_password}",
                                              "--out", "{work}/cal"], 1, "password", "***", needs="postgres"),
    case("worker-storage-malformed", C, ["worker", *TINY, "--budget", "2x", "--storage", "postgresql//me:" + SECRET + "@host/db",
                                         "--out", "{work}/cal"], 1, "storage URL"),
    case("worker-storage-postgres-scheme", C, ["worker", *TINY, "--budget", "2x", "--storage",
                                               "postgres://me:" + SECRET + "@127.0.0.1:5432/db", "--out", "{work}/cal"],
         1, "postgresql://"),
    case("worker-storage-sqlite-no-dir", C, ["worker", *TINY, "--budget", "2x", "--storage", "sqlite:///{work}/no/such/dir/s.db",
                                             "--out", "{work}/cal"], 1, "SQLite"),
    case("calibrate-storage-unreachable", C, [*TINY, *CAL, "--storage", "postgresql://me:" + SECRET + "@127.0.0.1:{free_port}/db",
                                              "--out", "{work}/cal"], 1, "127.0.0.1"),
    case("calibrate-storage-malformed", C, [*TINY, *CAL, "--storage", "postgresql//me:" + SECRET + "@host/db",
                                            "--out", "{work}/cal"], 1, "storage"),
]


def _files(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file()} if d.exists() else {}


@pytest.mark.parametrize("cli,argv,rc,words,needs", CASES)
def test_bad_input(cli, argv, rc, words, needs, inp, tmp_path, capsys, request):
    work = tmp_path / "work"
    work.mkdir()
    values = {k: str(v) for k, v in inp.items()}
    values.update(work=str(work), free_port=str(free_port()))
    if needs == "postgres":
        server = request.getfixturevalue("postgres")
        values["pg_wrong_password"] = server.url_with_password(SECRET)
    argv = [a.format(**values) for a in argv]
    before = _files(work)
    if cli == S:
        from stagevar.cli import main
    else:
        from calibrate.cli import main
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == rc, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    text = err.strip()
    assert text, "nothing on stderr"
    assert "\n\n" not in text, f"more than one paragraph:\n{err}"
    if rc == 1:
        assert text.startswith("error:") and "\n" not in text, f"not one line starting with 'error:':\n{err}"
    else:
        assert "error:" in text
    for w in words:
        assert w in text, (w, err)
    assert SECRET not in err and SECRET not in out, "a password was printed"
    assert _files(work) == before, "something was written"
    assert not inp["side_effect"].exists(), "the malicious checkpoint ran code"


@pytest.mark.parametrize("which", ["weights_malicious", "weights_malicious_zip"])
def test_malicious_checkpoint_never_runs_code(which, inp, tmp_path, capsys):
    """Whatever the message looks like: refused (exit 1), never executed, nothing built or written."""
    from stagevar.cli import main
    code = main(["generate", "--model", "var-d16", "--weights", str(inp[which]), "--prompt", "1", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    assert not inp["side_effect"].exists()
    assert not (tmp_path / "x.png").exists()
    # and the file really is a code-running pickle (the test would be vacuous otherwise)
    if which == "weights_malicious":
        with open(inp[which] / "var_d16.pth", "rb") as fh:
            pickle.load(fh)
        assert inp["side_effect"].exists()
        os.remove(inp["side_effect"])


def test_case_count():
    assert len(CASES) >= 30
