"""wsi-pipeline: whole-slide image analysis."""

import os

# Tile-reading worker processes share the CPU with the model's OpenMP threads. By default those threads spin while
# they wait for work, and a spinning thread takes the core from the reader that would feed it: on a 2-core machine
# end-to-end inference ran ~8 % slower than with sleeping threads (docs/benchmarks.md). OpenMP reads this once, when
# torch is first imported, so it only takes effect when wsi_pipeline is imported first; a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
