#!/usr/bin/env python
"""The inputs of configs/fig8/rehearsal.yaml, written in the real sources' formats and prepared.

    python scripts/prepare_rehearsal.py --output data/rehearsal

Then: regablate sweep configs/fig8/rehearsal.yaml (from the folder that holds data/).
"""

from regablate.cli import run_script
from regablate.data.rehearsal import prepare_rehearsal

if __name__ == "__main__":
    run_script(prepare_rehearsal)
