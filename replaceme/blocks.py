"""Which layers to cut: explicit blocks checked against the model, or blocks chosen by a score.

Blocks are 0-based and half-open, ``[s, e)`` = layers s … e-1 removed; the map of a block is
folded into layer ``s-1``, which therefore must exist and must not itself be removed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence

from replaceme.errors import ReplaceMeError

Block = tuple[int, int]


def check_blocks(blocks: Sequence[Block], num_layers: int, merge_consecutive: bool) -> list[Block]:
    """Validate explicit blocks against the model; merge touching blocks when allowed."""
    blocks = sorted((start, end) for start, end in blocks)  # YAML gives lists
    for start, end in blocks:
        if end - start >= num_layers:
            raise ReplaceMeError(f"blocks: [{start}, {end}] would remove {end - start} of the model's {num_layers} layers")
        if end > num_layers:
            raise ReplaceMeError(f"blocks: [{start}, {end}] ends past the model's last layer ({num_layers} layers, 0..{num_layers - 1})")
    return _merge_touching(blocks, merge_consecutive)  # starts >= 1: layer 0 always stays


def check_selection(num_layers: int, layers_to_skip: int, num_A: int, min_distance_layer: int,
                    merge_consecutive: bool) -> None:
    """Refuse, before any layer runs, a selection by distance that cannot succeed: ``layers_to_skip``
    as large as the model, ``min_distance_layer`` leaving no candidate block, or ``num_A`` blocks that
    cannot all fit between it and the last layer without overlapping (with a layer left between
    blocks when ``merge_consecutive`` is false). Passing is necessary, not sufficient: which blocks
    the distances pick first may still leave too little room (``select_blocks`` says so then)."""
    size = layers_to_skip
    if size >= num_layers:
        raise ReplaceMeError(f"layers_to_skip: {size} must be smaller than the model's {num_layers} layers")
    first = max(1, min_distance_layer)  # layer 0 always stays: a map is folded into the layer before its block
    room = num_layers - first  # layers first … num_layers-1
    if room < size:
        raise ReplaceMeError(
            f"min_distance_layer: {min_distance_layer} leaves no candidate block of layers_to_skip={size} layers in "
            f"the model's {num_layers} layers (the last starts at layer {num_layers - size}); lower "
            "min_distance_layer or layers_to_skip")
    fit = room // size if merge_consecutive else (room + 1) // (size + 1)
    if num_A > fit:
        gap = "" if merge_consecutive else ", a layer apart as merge_consecutive is false"
        raise ReplaceMeError(
            f"num_A: {num_A} blocks of layers_to_skip={size} layers do not fit in layers {first}..{num_layers - 1} "
            f"(min_distance_layer {min_distance_layer}, {num_layers} layers): at most {fit} fit{gap}; lower num_A "
            f"or layers_to_skip{'' if merge_consecutive else ', or set merge_consecutive: true'}")


def _merge_touching(blocks: list[Block], merge_consecutive: bool) -> list[Block]:
    merged: list[Block] = []
    for start, end in blocks:
        if merged and start == merged[-1][1]:
            if not merge_consecutive:
                raise ReplaceMeError(
                    f"blocks: {list(merged[-1])} and {[start, end]} touch, so layer {start - 1}, where the second "
                    "map would be folded, is removed; set merge_consecutive: true or leave a layer between them"
                )
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def select_blocks(distances: Sequence[tuple[int, int, float]], *, num_blocks: int, min_start: int,
                  merge_consecutive: bool, num_layers: int) -> list[Block]:
    """The ``num_blocks`` lowest-scoring blocks that don't overlap (greedy, lowest first), from
    ``[(s, e, score), …]``: the angular distance, or the residual of ``replaceme.selection``.

    Touching blocks are merged when ``merge_consecutive``; otherwise a candidate must leave the
    layer before it (its fold target) in place.
    """
    candidates = sorted((d, s, e) for s, e, d in distances if s >= min_start)
    if not candidates:
        raise ReplaceMeError(f"min_distance_layer: no candidate block starts at or after layer {min_start}")
    chosen: list[Block] = []
    for _, start, end in candidates:
        if len(chosen) == num_blocks:
            break
        if all(_compatible((start, end), other, merge_consecutive) for other in chosen):
            chosen.append((start, end))
    if len(chosen) < num_blocks:
        raise ReplaceMeError(f"num_A: only {len(chosen)} non-overlapping blocks fit; lower num_A or layers_to_skip")
    return check_blocks(chosen, num_layers, merge_consecutive)


def _compatible(a: Block, b: Block, merge_consecutive: bool) -> bool:
    (s1, e1), (s2, e2) = sorted([a, b])
    return e1 < s2 or (e1 == s2 and merge_consecutive)


def distances_to_csv(distances: Sequence[tuple[int, int, float]], model_digest: str,
                     residuals: Mapping[Block, float] | None = None) -> str:
    """The profile as CSV: every candidate's angular distance and, when measured, its residual
    (``replaceme.selection``), each with its rank (1 = removed first); each row names the model it
    was measured on (its config + index digest)."""
    distance_rank = _ranks({(s, e): d for s, e, d in distances})
    residual_rank = _ranks(residuals or {})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["start", "end", "angular_distance", "distance_rank", "residual", "residual_rank", "model_digest"])
    for s, e, d in distances:
        residual = (residuals or {}).get((s, e))
        writer.writerow((s, e, f"{d:.8f}", distance_rank[(s, e)], "" if residual is None else f"{residual:.8e}",
                         residual_rank.get((s, e), ""), model_digest))
    return out.getvalue()


def _ranks(scores: Mapping[Block, float]) -> dict[Block, int]:
    """1 for the lowest score (ties by start), as :func:`select_blocks` takes them."""
    return {block: rank for rank, (_, block) in enumerate(sorted((v, b) for b, v in scores.items()), start=1)}


def distances_from_csv(text: str, source: str) -> list[tuple[int, int, float]]:
    return [(s, e, d) for s, e, d, _, _ in _distance_rows(text, source)]


def residuals_from_csv(text: str, source: str) -> dict[Block, float] | None:
    """The residual of every candidate in a saved profile; None when it has none (distance only)."""
    residuals = {(s, e): r for s, e, _, r, _ in _distance_rows(text, source) if r is not None}
    return residuals or None


def reusable_distances(text: str, source: str, *, block_size: int, model_digest: str) -> list[tuple[int, int, float]]:
    """A saved profile, refused when it was measured for another block size or on another model
    (reusing it would remove the wrong number of layers, or layers chosen for another model)."""
    rows = _distance_rows(text, source)
    distances = [(s, e, d) for s, e, d, _, _ in rows]
    if not distances:
        raise ReplaceMeError(f"distances_path: {source} holds no distances; delete it to measure them again")
    sizes = sorted({e - s for s, e, _ in distances})
    if sizes != [block_size]:
        raise ReplaceMeError(f"distances_path: {source} holds distances of {'/'.join(map(str, sizes))}-layer blocks, "
                             f"but layers_to_skip is {block_size}; point distances_path at another file (or delete "
                             "it) to measure them again")
    recorded = {digest for *_, digest in rows}
    if recorded != {model_digest}:
        shown = ", ".join(sorted(str(d) for d in recorded))
        raise ReplaceMeError(f"distances_path: {source} was measured on another model (digest {shown}, this one is "
                             f"{model_digest}); point distances_path at another file (or delete it) to measure again")
    return distances


def _distance_rows(text: str, source: str) -> list[tuple[int, int, float, float | None, str | None]]:
    """(start, end, distance, residual or None, model digest) per row; files written before the
    residual was measured have no such column."""
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
        return [(int(r["start"]), int(r["end"]), float(r["angular_distance"]),
                 float(r["residual"]) if r.get("residual") else None, r.get("model_digest")) for r in rows]
    except (KeyError, ValueError, TypeError) as exc:
        raise ReplaceMeError(f"distances_path: {source} is not a distances.csv written by replaceme ({exc})") from None
