#!/usr/bin/env python
"""Build an agecl shard set from raw face photos or the generated dataset.

A thin command line over `agecl.build` (all the logic lives there); `--help` for the options.

    python tools/make_shards.py --dataset fgnet --root data/FGNET/images --out shards/fgnet
    python tools/make_shards.py --synthetic 2000 --out shards/synthetic
"""

import sys
from pathlib import Path

# Run from a checkout without installing agecl. Spawned worker processes inherit sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agecl.build import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
