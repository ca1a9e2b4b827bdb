"""``python -m ops.calibrate``: run the model up to the last layer a block needs and save each
block's statistics (calibration/) and map (transforms.safetensors). The heavy step: with
``engine.backend: ray`` it runs on the Ray cluster the process is in (a RayJob)."""

from __future__ import annotations

import sys

from ops.common import Step, StepRun, artefact_uris
from replaceme import recipe


def _work(job: StepRun) -> dict:
    details = recipe.calibrate(job.ctx, job.out, recipe.saved_blocks(job.out))
    return {"solver": details, "artefacts": artefact_uris(job.out, "transforms.safetensors", "calibration")}


STEP = Step("calibrate", _work, help=__doc__.split("\n\n")[0], inputs=lambda config: {"blocks.json": "profile"})
calibrate = STEP.run

if __name__ == "__main__":
    sys.exit(STEP.main())
