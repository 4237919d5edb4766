#!/usr/bin/env python
"""ADE20k (ADEChallengeData2016.zip) -> a saved dataset for regablate's segmentation probe.

    python scripts/prepare_ade20k.py ADEChallengeData2016.zip --output data/ade20k

Then probe with --data.init_args.path data/ade20k (see configs/fig8/paper.yaml, stage probe_seg).
"""

from regablate.cli import run_script
from regablate.data.ade20k import prepare_ade20k

if __name__ == "__main__":
    run_script(prepare_ade20k)
