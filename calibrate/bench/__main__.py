"""``python3 -m calibrate.bench``: ``stagevar-calibrate bench`` without the entry point."""
import sys

from calibrate.bench.cli import main

sys.exit(main(prog="python3 -m calibrate.bench"))
