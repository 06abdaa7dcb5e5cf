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
