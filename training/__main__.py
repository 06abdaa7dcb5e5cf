"""``python -m training``: ``stagevar-train`` without the entry point."""
import sys

from training.cli import main

sys.exit(main(prog="python -m training"))
