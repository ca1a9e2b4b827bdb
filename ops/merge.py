"""``python -m ops.merge``: fold the maps into a pruned copy of the source checkpoint (model/),
streamed tensor by tensor; split across Ray tasks with ``engine.backend: ray`` and
``engine.merge_workers > 1``."""

from __future__ import annotations

from ops.common import Step
from replaceme.cli import exit_process

STEP = Step("merge", help=__doc__.split("\n\n")[0])
merge = STEP.run

if __name__ == "__main__":
    exit_process(STEP.main())
