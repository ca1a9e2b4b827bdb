"""Quality: perplexity of the bundled model after removing 25% of its layers.

One block of L/4 layers chosen by angular distance, then: ReplaceMe least squares, ReplaceMe
cosine (Adam and L-BFGS), and plain dropping of the same layers, against the original. A second
table removes two blocks and compares the sequential fit (each block fitted on the model with
the earlier block already replaced, our default) with fitting all blocks on the unpruned model
(what the published least-squares code does).

    python benchmarks/quality.py [--model examples/shakespeare-llama-16l]
"""

from __future__ import annotations

import argparse
import tempfile

from _record import machine, record, table
from replaceme import recipe
from replaceme.checkpoint import Checkpoint
from replaceme.config import validate_config
from replaceme.engine import LocalEngine

CALIB, EVAL = "examples/data/calib.jsonl", "examples/data/eval.jsonl"


def prune(model: str, out: str, **settings) -> dict:
    config = validate_config(dict(model_path=model, dataset=CALIB, eval=EVAL, output_dir=out, batch_size=16,
                                  max_length=128, **settings))
    return recipe.run(config, progress=False)


def dropped_perplexity(model: str, blocks: list[list[int]], out: str) -> float:
    """The same layers simply removed, no map."""
    config = validate_config(dict(model_path=model, dataset=CALIB, eval=EVAL, output_dir=out, max_length=128, batch_size=16))
    ctx = recipe.Context(config, progress=False)
    skip = {i for s, e in blocks for i in range(s, e)}
    with Checkpoint(model) as checkpoint:
        return LocalEngine(ctx.layerwise(checkpoint), ctx.eval_batches, progress=False).perplexity(skip)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="examples/shakespeare-llama-16l")
    args = parser.parse_args()
    work = tempfile.mkdtemp()
    layers = Checkpoint(args.model).config["num_hidden_layers"]
    quarter = layers // 4

    lstsq = prune(args.model, f"{work}/lstsq", layers_to_skip=quarter)
    blocks = lstsq["blocks"]
    adam = prune(args.model, f"{work}/adam", blocks=blocks, method="cosine", solver="adam")
    lbfgs = prune(args.model, f"{work}/lbfgs", blocks=blocks, method="cosine", solver="lbfgs", cosine={"steps": 100})
    dropped = dropped_perplexity(args.model, blocks, f"{work}/unused")
    original = lstsq["perplexity_before"]
    rows = [["original", "—", f"{original:.2f}", "1.000"]]
    for name, ppl in [("ReplaceMe lstsq", lstsq["perplexity_after"]), ("ReplaceMe cosine (Adam)", adam["perplexity_after"]),
                      ("ReplaceMe cosine (L-BFGS)", lbfgs["perplexity_after"]), ("drop the layers (no map)", dropped)]:
        rows.append([name, str(blocks), f"{ppl:.2f}", f"{original / ppl:.3f}"])
    print(table(["model", "removed", "perplexity", "retention"], rows))

    two = dict(layers_to_skip=quarter // 2, num_A=2, merge_consecutive=False)
    sequential = prune(args.model, f"{work}/seq", **two)
    unpruned = prune(args.model, f"{work}/unpruned", **two, sequential=False)
    dropped_two = dropped_perplexity(args.model, sequential["blocks"], f"{work}/unused")
    rows_two = [["sequential (default)", str(sequential["blocks"]), f"{sequential['perplexity_after']:.2f}"],
                ["all on the unpruned model", str(unpruned["blocks"]), f"{unpruned['perplexity_after']:.2f}"],
                ["drop the layers (no map)", str(sequential["blocks"]), f"{dropped_two:.2f}"]]
    print(table(["fit", "removed", "perplexity"], rows_two))

    record("Quality: 25% of the layers removed (bundled model)", f"""
`python benchmarks/quality.py` — {args.model} ({layers} layers), calibration on `{CALIB}`
({lstsq['calibration_tokens']} tokens), perplexity on the held-out `{EVAL}` ({lstsq['eval_tokens']} tokens),
one block of {quarter} layers chosen by angular distance. Retention = original perplexity / perplexity.
Machine: {machine()}.

{table(["model", "removed", "perplexity", "retention"], rows)}

Two blocks of {quarter // 2} layers (num_A 2): each later block fitted on the stream of the model whose
earlier block is already replaced, vs all blocks fitted on the unpruned model (the published code's way).

{table(["fit", "removed", "perplexity"], rows_two)}
""")


if __name__ == "__main__":
    main()
