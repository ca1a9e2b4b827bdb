"""``python -m ops.evaluate``: perplexity of the source and the pruned model on the eval text,
and the run's report.json (the same keys as ``replaceme run`` writes, with every step's seconds
and peak memory taken from the step markers)."""

from __future__ import annotations

from ops.common import Step
from replaceme.cli import exit_process

STEP = Step("evaluate", help=__doc__.split("\n\n")[0])
evaluate = STEP.run

if __name__ == "__main__":
    exit_process(STEP.main())
