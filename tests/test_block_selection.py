"""`selection:` through the recipe on the bundled trained model: residual (the default) and distance
each choose their own lowest-scoring block, both rankings are recorded (distances.csv,
selection.json, report.json), a saved profile is reused, and residual selection falls back to
distance, saying why, when the candidates' statistics cannot be gathered."""

from __future__ import annotations

import csv
import io
import json

import pytest

from conftest import BUNDLED_MODEL, CALIB, EVAL
from replaceme import recipe
from replaceme.config import validate_config
from replaceme.engine import LocalEngine
from replaceme.errors import ReplaceMeError
from replaceme.selection import stream_residuals
from replaceme.stats import CandidateStats

SKIP = 4  # layers per block


def config_for(tmp_path, name: str, **changes):
    values = dict(model_path=str(BUNDLED_MODEL), dataset=str(CALIB), dataset_size=32, batch_size=8, max_length=64,
                  layers_to_skip=SKIP, output_dir=str(tmp_path / name), save_transform_only=True,
                  mlflow={"enabled": False})
    return validate_config({**values, **changes})


def profile_rows(folder) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / "distances.csv").read_text())))


def lowest(rows, column: str) -> list[list[int]]:
    best = min(rows, key=lambda r: (float(r[column]), int(r["start"])))
    return [[int(best["start"]), int(best["end"])]]


def test_each_criterion_chooses_its_lowest_block_and_both_rankings_are_recorded(tmp_path):
    by_residual = recipe.run(config_for(tmp_path, "residual"), progress=False)
    by_distance = recipe.run(config_for(tmp_path, "distance", selection="distance"), progress=False)

    rows = profile_rows(tmp_path / "residual")
    assert len(rows) == 16 - SKIP and all(r["residual"] for r in rows)
    assert by_residual["blocks"] == lowest(rows, "residual")
    assert [int(r["residual_rank"]) for r in sorted(rows, key=lambda r: float(r["residual"]))] == \
        list(range(1, len(rows) + 1))
    selection = json.loads((tmp_path / "residual" / "selection.json").read_text())
    assert selection == {"criterion": "residual", "requested": "residual", "reason": None,
                         "blocks_by_criterion": {"residual": lowest(rows, "residual"),
                                                 "distance": lowest(rows, "angular_distance")}}

    distance_rows = profile_rows(tmp_path / "distance")
    assert by_distance["blocks"] == lowest(distance_rows, "angular_distance") == lowest(rows, "angular_distance")
    assert [r["angular_distance"] for r in distance_rows] == [r["angular_distance"] for r in rows]
    assert not any(r["residual"] for r in distance_rows)  # not measured: not invented
    assert json.loads((tmp_path / "distance" / "selection.json").read_text())["criterion"] == "distance"


def test_recorded_residuals_are_the_candidates_statistics_residuals(tmp_path):
    """The residual of every candidate in distances.csv equals the least-squares residual computed
    from that candidate's statistics, measured by the engine directly."""
    config = config_for(tmp_path, "out")
    recipe.run(config, progress=False)
    ctx = recipe.Context(config, progress=False)
    profile = LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.batches, progress=False).profile(
        SKIP, statistics=True, weighted=True)
    assert profile.candidates is not None
    expected = stream_residuals(profile.candidates)
    recorded = {(int(r["start"]), int(r["end"])): float(r["residual"]) for r in profile_rows(tmp_path / "out")}
    assert recorded.keys() == expected.keys()
    assert all(recorded[b] == pytest.approx(v, rel=1e-7) for b, v in expected.items())


def test_the_report_and_the_model_card_record_the_selection(tmp_path):
    report = recipe.run(config_for(tmp_path, "out", save_transform_only=False,
                                   eval={"dataset": str(EVAL), "dataset_size": 8, "max_length": 64, "cache": False}),
                        progress=False)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["selection"]["criterion"] == "residual"
    assert saved["selection"]["blocks_by_criterion"]["residual"] == saved["blocks"] == report["blocks"]
    assert "chosen by the residual their least-squares maps leave" in (tmp_path / "out" / "model" / "README.md").read_text()


def test_residual_selection_falls_back_to_distance_when_the_statistics_are_not_gathered(tmp_path, monkeypatch,
                                                                                        caplog):
    """A budget whose half cannot hold every candidate's statistics: the profile measures distances
    only, and the blocks are chosen by distance, with the reason in the log and selection.json."""
    hidden = 128  # the bundled model's
    need = (16 - SKIP) * CandidateStats.nbytes(hidden, weighted=True)
    config = config_for(tmp_path, "out", engine={"memory_budget": 2 * need - 1})
    result = recipe.run(config, progress=False)
    rows = profile_rows(tmp_path / "out")
    assert result["blocks"] == lowest(rows, "angular_distance")
    assert not any(r["residual"] for r in rows)
    selection = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert (selection["criterion"], selection["requested"]) == ("distance", "residual")
    assert "not gathered" in selection["reason"]
    assert "chosen by angular distance" in caplog.text and "engine.memory_budget" in caplog.text


def test_a_saved_profile_is_reused_and_one_without_residuals_only_for_distance(tmp_path, monkeypatch):
    saved = tmp_path / "profile.csv"
    first = recipe.run(config_for(tmp_path, "first", distances_path=str(saved)), progress=False)
    monkeypatch.setattr(LocalEngine, "profile", lambda *a, **k: pytest.fail("the saved profile is measured again"))
    again = recipe.run(config_for(tmp_path, "again", distances_path=str(saved)), progress=False)
    assert again["blocks"] == first["blocks"]

    # a profile saved before residuals were measured: angular distances only
    old = tmp_path / "old.csv"
    rows = profile_rows(tmp_path / "first")
    old.write_text("start,end,angular_distance,model_digest\n" + "".join(
        f"{r['start']},{r['end']},{r['angular_distance']},{r['model_digest']}\n" for r in rows))
    with pytest.raises(ReplaceMeError, match=rf"distances_path: {old} holds angular distances only .* "
                                             "selection: distance"):
        recipe.run(config_for(tmp_path, "old", distances_path=str(old)), progress=False)
    by_distance = recipe.run(config_for(tmp_path, "old", distances_path=str(old), selection="distance",
                                        overwrite=True), progress=False)
    assert by_distance["blocks"] == lowest(rows, "angular_distance")


def test_selection_is_validated():
    with pytest.raises(ReplaceMeError, match="selection"):
        validate_config(dict(model_path=str(BUNDLED_MODEL), dataset=str(CALIB), selection="perplexity"))
