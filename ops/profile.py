"""``python -m ops.profile``: the blocks to remove (blocks.json), chosen by angular distance
(distances.csv, distances.png) unless the config names them in ``blocks``."""

from __future__ import annotations

from ops.common import Step
from replaceme.cli import exit_process

STEP = Step("profile", help=__doc__.split("\n\n")[0])
profile = STEP.run

if __name__ == "__main__":
    exit_process(STEP.main())
