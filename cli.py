"""Run the qanalyze CLI from a checkout: ``python cli.py plan ...`` is ``qanalyze plan ...``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qanalyze.entry import main

if __name__ == "__main__":
    sys.exit(main())
