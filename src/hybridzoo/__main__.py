"""`python -m hybridzoo ...` — the same program as `hybridzoo` (and what torchrun launches with -m)."""

import sys

from hybridzoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
