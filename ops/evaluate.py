"""``python -m ops.evaluate``: perplexity of the source and the pruned model on the eval text,
and the run's report.json (the same keys as ``replaceme run`` writes, with every step's seconds
and peak memory taken from the step markers)."""

from __future__ import annotations

import logging
import sys

from ops.common import Step, StepRun, artefact_uris
from replaceme import recipe

log = logging.getLogger("replaceme.ops")


def _work(job: StepRun) -> dict:
    ctx = job.ctx
    if ctx.eval_texts is None:
        log.warning("evaluate: no eval data configured; report.json will have no perplexities")
    metrics = recipe.evaluate(ctx, job.out)
    _gather_step_figures(ctx, job.upstream)
    report = recipe.build_report(ctx, recipe.saved_blocks(job.out), job.upstream["solve"]["solver"], metrics)
    job.out.write_json("report.json", report)
    return {"metrics": metrics, "artefacts": artefact_uris(job.out, "report.json")}


def _gather_step_figures(ctx, markers: dict[str, dict]) -> None:
    """Each step ran in its own process: put their timings and peaks in front of this step's."""
    timings, memory = {}, {}
    for marker in markers.values():
        timings.update(marker.get("timings", {}))
        memory.update(marker.get("step_memory", {}))
    ctx.timings = {**timings, **ctx.timings}
    ctx.step_memory = {**memory, **ctx.step_memory}


STEP = Step("evaluate", _work, help=__doc__.split("\n\n")[0], inputs=lambda config: {"model/config.json": "merge"})
evaluate = STEP.run

if __name__ == "__main__":
    sys.exit(STEP.main())
