"""``python -m ops.solve``: solve each block's map from the saved statistics (no model run), so
another ``alpha`` or estimator re-runs only this step and the ones after it."""

from __future__ import annotations

import sys

from ops.common import Step

STEP = Step("solve", help=__doc__.split("\n\n")[0])
solve = STEP.run

if __name__ == "__main__":
    sys.exit(STEP.main())
