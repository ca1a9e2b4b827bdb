"""``python -m ops.register``: record the finished output folder as one MLflow run (params,
metrics, lineage, artefacts) and, with ``mlflow.register_as``, register the pruned model."""

from __future__ import annotations

from ops.common import Step
from replaceme.cli import exit_process

STEP = Step("register", help=__doc__.split("\n\n")[0])
register = STEP.run

if __name__ == "__main__":
    exit_process(STEP.main())
