#!/usr/bin/env python
"""Load-test harness: the same as ``python -m faser_sgl.bench`` (see faser_sgl/bench/cli.py).

Example (the report in docs/results.md):
  .venv/bin/python scripts/load_test.py --output-dir docs/results --report docs/results.md
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from faser_sgl.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
