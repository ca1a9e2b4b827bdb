"""``python -m ops.merge``: fold the maps into a pruned copy of the source checkpoint (model/),
streamed tensor by tensor; split across Ray tasks with ``engine.backend: ray`` and
``engine.merge_workers > 1``."""

from __future__ import annotations

import sys

from ops.common import Step

STEP = Step("merge", help=__doc__.split("\n\n")[0])
merge = STEP.run

if __name__ == "__main__":
    sys.exit(STEP.main())
