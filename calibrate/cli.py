"""`stagevar-calibrate`: measure a model, search a policy under a latency budget, write it."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("stagevar-calibrate: calibration is not built yet in this version; no policy was written.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
