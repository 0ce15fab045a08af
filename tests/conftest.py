"""Makes tests/_helpers.py importable from every test folder (the test folders are not packages)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
