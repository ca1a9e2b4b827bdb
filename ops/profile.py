"""``python -m ops.profile``: the blocks to remove (blocks.json), chosen by angular distance
(distances.csv, distances.png) unless the config names them in ``blocks``."""

from __future__ import annotations

import sys

from ops.common import Step, StepRun, artefact_uris
from replaceme import recipe


def _work(job: StepRun) -> dict:
    if job.ctx.blocks:  # named in the config: nothing to measure
        blocks = job.ctx.blocks
        job.out.write_json("blocks.json", [list(b) for b in blocks])
        return {"blocks": [list(b) for b in blocks], "selected": False, "artefacts": artefact_uris(job.out, "blocks.json")}
    blocks = recipe.profile(job.ctx, job.out)
    return {"blocks": [list(b) for b in blocks], "selected": True,
            "artefacts": artefact_uris(job.out, "blocks.json", "distances.csv", "distances.png")}


STEP = Step("profile", _work, help=__doc__.split("\n\n")[0])
profile = STEP.run

if __name__ == "__main__":
    sys.exit(STEP.main())
