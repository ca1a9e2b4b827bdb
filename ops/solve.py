"""``python -m ops.solve``: solve each block's map from the saved statistics (no model run), so
another ``alpha`` or estimator re-runs only this step and the ones after it."""

from __future__ import annotations

from ops.common import Step
from replaceme.cli import exit_process

STEP = Step("solve", help=__doc__.split("\n\n")[0])
solve = STEP.run

if __name__ == "__main__":
    exit_process(STEP.main())
