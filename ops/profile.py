"""``python -m ops.profile``: the blocks to remove (blocks.json), chosen by angular distance
(distances.csv, distances.png) unless the config names them in ``blocks``."""

from __future__ import annotations

import sys

from ops.common import Step

STEP = Step("profile", help=__doc__.split("\n\n")[0])
profile = STEP.run

if __name__ == "__main__":
    sys.exit(STEP.main())
