"""``python -m ops.merge``: fold the maps into a pruned copy of the source checkpoint (model/),
streamed tensor by tensor; split across Ray tasks with ``engine.backend: ray`` and
``engine.merge_workers > 1``."""

from __future__ import annotations

import sys

from ops.common import Step, StepRun, artefact_uris
from replaceme import recipe


def _work(job: StepRun) -> dict:
    # This step owns model/: a previous attempt may have published it without reaching its marker.
    job.ctx.config = job.ctx.config.model_copy(update={"overwrite": True})
    recipe.merge(job.ctx, job.out)
    return {"artefacts": artefact_uris(job.out, "model")}


STEP = Step("merge", _work, help=__doc__.split("\n\n")[0],
            inputs=lambda config: {"transforms.safetensors": "solve"})
merge = STEP.run

if __name__ == "__main__":
    sys.exit(STEP.main())
