"""The paper's reproduction settings on a Llama-3-8B-shaped config, planned in 64 GB.

8,000 texts × 1,024 tokens, batch 8, 8 of 32 layers removed, ``engine.memory_budget: 64GB``: what
``replaceme plan`` says the in-process engine needs, for each block selection. No weights are read:
the plan is the engine's own arithmetic (``replaceme.memory``) on the config alone.

    python benchmarks/paper_shape_plan.py
"""

from __future__ import annotations

from _record import record, table
from replaceme.config import validate_config
from replaceme.planner import InProcessPlan, build_plan

GiB = 2**30
BUDGET = "64GB"

# Meta-Llama-3-8B's config.json, the fields the planner reads
LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=32, hidden_size=4096,
    intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    torch_dtype="bfloat16", rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)
PAPER = dict(model_path="llama-3-8b-shaped", dataset="never-read.jsonl", dataset_size=8000, max_length=1024,
             batch_size=8, layers_to_skip=8, engine=dict(memory_budget=BUDGET))


def in_process(selection: str) -> InProcessPlan:
    return build_plan(LLAMA3_8B, validate_config({**PAPER, "selection": selection})).in_process


def rows(selection: str, p: InProcessPlan) -> list[list]:
    return [[selection, f"{s.name} ({s.layers} layers)", f"{s.chunks:,} × {s.chunk_batches}", "yes" if s.resident else "no",
             f"{s.weights_bytes / GiB:.2f}", f"{s.fixed_bytes / GiB:.2f}", f"{s.peak_bytes / GiB:.2f}",
             f"{s.least_bytes / GiB:.2f}", f"{p.budget_bytes / GiB:.2f}", "**yes**" if p.fits else "**no**"]
            for s in p.passes]


def main() -> None:
    plans = {selection: in_process(selection) for selection in ("residual", "distance")}
    verdict = "met" if all(p.fits for p in plans.values()) else "NOT met"
    headers = ["selection", "pass", "chunks × batches", "weights resident", "weights GiB", "fixed GiB",
               "peak GiB", "least GiB", "budget GiB", "fits"]
    text = table(headers, [row for selection, p in plans.items() for row in rows(selection, p)])
    print(text)
    record("Plan: the paper's reproduction shape in 64 GB", f"""
`python benchmarks/paper_shape_plan.py` — `replaceme plan`'s in-process figures (the engine's own arithmetic,
no weights read) for a Llama-3-8B-shaped config (32 layers, hidden 4096, intermediate 14336, 8 KV heads,
vocabulary 128,256), the paper's settings: 8,000 texts × 1,024 tokens (8,192,000 tokens), batch 8, 8 layers
removed, `engine.memory_budget: {BUDGET}`, computed in float32 on CPU. *fixed* = the candidates'
(or the selected block's) float64 statistics, the embeddings, one layer's temporaries; *least* = the smallest
budget in which the pass runs at all (weights streamed, one batch per chunk).

{text}

Target (the paper's reproduction shape on an 8B-shaped config fits 64 GB in `plan`), both selections:
**{verdict}**. `tests/test_planner.py::test_paper_reproduction_shape_fits_64_gb_in_process`
checks the same plan's figures against hand counts.
""")


if __name__ == "__main__":
    main()
