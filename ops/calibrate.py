"""``python -m ops.calibrate``: run the model up to the last layer a block needs and save each
block's statistics (calibration/) and map (transforms.safetensors). The heavy step: with
``engine.backend: ray`` it runs on the Ray cluster the process is in (a RayJob)."""

from __future__ import annotations

from ops.common import Step
from replaceme.cli import exit_process

STEP = Step("calibrate", help=__doc__.split("\n\n")[0])
calibrate = STEP.run

if __name__ == "__main__":
    exit_process(STEP.main())
