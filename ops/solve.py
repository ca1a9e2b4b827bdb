"""``python -m ops.solve``: solve each block's map from the saved statistics (no model run), so
another ``alpha`` or estimator re-runs only this step and the ones after it."""

from __future__ import annotations

import sys

from ops.common import Step, StepRun, artefact_uris
from replaceme import recipe


def _work(job: StepRun) -> dict:
    return {"solver": recipe.solve(job.ctx, job.out), "artefacts": artefact_uris(job.out, "transforms.safetensors")}


def _inputs(config) -> dict[str, str]:
    inputs = {"blocks.json": "calibrate"}
    if config.activations.uri is None:  # else the statistics live in the activation store
        inputs["calibration"] = "calibrate"
    return inputs


STEP = Step("solve", _work, help=__doc__.split("\n\n")[0], inputs=_inputs)
solve = STEP.run

if __name__ == "__main__":
    sys.exit(STEP.main())
