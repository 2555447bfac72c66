"""``python -m engram_ray.agent ARGS``: the same as ``engram-ray agent ARGS``."""

import sys

from engram_ray.cli import main

sys.exit(main(["agent", *sys.argv[1:]]))
