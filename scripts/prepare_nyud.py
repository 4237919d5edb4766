#!/usr/bin/env python
"""NYU Depth v2 -> a saved dataset for regablate's depth probe (needs the extra: pip install -e ".[prepare]").

    python scripts/prepare_nyud.py labeled --labeled nyu_depth_v2_labeled.mat --splits splits.mat --output data/nyud
    python scripts/prepare_nyud.py lists --train_list nyu_train.txt --test_list nyu_test.txt --root data/nyu \\
        --output data/nyud

Then probe with --data.init_args.path data/nyud (see configs/fig8/paper.yaml, stage probe_depth).
"""

from regablate.cli import run_script
from regablate.data.nyud import prepare_nyud

if __name__ == "__main__":
    run_script(prepare_nyud)
