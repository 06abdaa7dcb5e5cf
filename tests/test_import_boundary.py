"""`import stagevar` (and generating with it) must not pull in calibrate, optuna or scipy."""
import subprocess
import sys

CODE = """
import sys
import stagevar
from stagevar.runtime import Runtime
from stagevar.policy import Policy
m = stagevar.load_model("infinity-tiny")
Runtime(m, Policy.identity(m)).generate(["a red circle"], seed=0)
stagevar.list_models()
bad = sorted(k for k in sys.modules if k.split(".")[0] in {"calibrate", "optuna", "scipy", "sqlalchemy", "alembic"})
print("BAD:" + ",".join(bad))
"""


def test_runtime_import_stays_light():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "BAD:", out.stdout


HEAVY = {"calibrate", "training", "optuna", "scipy", "matplotlib", "sqlalchemy", "alembic", "tqdm"}
#: the optional dependencies a runtime module may import, and why: ``stagevar evaluate`` (the extra
#: ``[evaluate]``) checks for scipy before it starts, and draws a progress bar only when tqdm is there
OPTIONAL = {"stagevar/toy/evaluate.py": {"scipy"}, "stagevar/toy/evaluate_cli.py": {"scipy", "tqdm"}}


def test_no_runtime_module_imports_the_calibration_side():
    """Read every module of the runtime package, imports inside functions included: none may import
    ``calibrate`` or its dependencies, even where only one command would reach the import (a
    ``stagevar`` module that did would make the runtime's dependencies a lie)."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "stagevar"
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            rel = path.relative_to(root.parent).as_posix()
            found += [f"{rel}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in HEAVY - OPTIONAL.get(rel, set())]
    assert found == [], "\n".join(found)


def test_evaluate_without_scipy_says_what_to_install():
    code = ("import sys; sys.modules['scipy'] = None\n"
            "from stagevar.cli import main; sys.exit(main(['evaluate', '--limit', '1', '--seeds', '1']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "pip install -e '.[evaluate]'" in out.stderr and "Traceback" not in out.stderr
