"""``python -m ops.register``: record the finished output folder as one MLflow run (params,
metrics, lineage, artefacts) and, with ``mlflow.register_as``, register the pruned model."""

from __future__ import annotations

import logging
import sys

from ops.common import Step, StepRun

log = logging.getLogger("replaceme.ops")


def _work(job: StepRun) -> dict:
    if not job.config.mlflow.enabled:
        log.info("register: mlflow.enabled is false; nothing recorded")
        return {"mlflow_run_id": None, "artefacts": {}}
    from replaceme.tracking import log_output

    run_id = log_output(job.out.uri, job.config)
    return {"mlflow_run_id": run_id, "registered_as": job.config.mlflow.register_as, "artefacts": {}}


STEP = Step("register", _work, help=__doc__.split("\n\n")[0], inputs=lambda config: {"report.json": "evaluate"},
            needs_model=False)
register = STEP.run

if __name__ == "__main__":
    sys.exit(STEP.main())
