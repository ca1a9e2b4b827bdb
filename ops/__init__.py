"""The ReplaceMe pipeline steps, each runnable alone: ``python -m ops.<step> --config FILE_OR_URI``.

profile → calibrate → solve → merge → evaluate → register. Each step is a thin layer over
:mod:`replaceme.recipe` that reads its inputs from and writes its artefacts to the output
folder (a local path or fsspec URI) and marks itself done with ``steps/<step>.json``.
As functions: ``from ops.calibrate import calibrate; calibrate("job.yaml", output="s3://…")``.
"""

from replaceme.markers import STEPS  # noqa: F401 - the pipeline's steps, in order
