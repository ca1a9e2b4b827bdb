"""The Ray engine against the in-process engine, on a real Ray head on loopback.

R replicas × S stages must give the same statistics, maps and block distances as one process, to
float64 round-off (the partial sums are only added in another order); among themselves, Ray runs
give bit-identical results (partials are summed in shard order): a stage actor killed mid-run is
restarted and its shard re-run, shards arriving in another order and a rerun resuming from
committed shards all give the undisturbed run's statistics exactly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import closing, contextmanager, nullcontext

import pytest
import torch

from conftest import BUNDLED_MODEL, CALIB, write_config
from replaceme import cli, recipe
from replaceme.config import validate_config
from replaceme.distributed.stage import Payload, PhasePlan, Stage, StageRestarted
from replaceme.engine import LocalEngine
from replaceme.errors import ReplaceMeError
from replaceme.stats import AngleSums, CandidateStats

ray = pytest.importorskip("ray")

BLOCKS = [(3, 6), (8, 10)]
PROFILED = 6  # block size profiled: longer than the stages of S=3 (4-6 layers), so windows cross stages


def settings(tmp_path, head, **overrides) -> dict:
    engine = {"backend": "ray", "address": head.address, "batches_per_shard": 2, "resource_timeout_s": 60}
    engine.update(overrides.pop("engine", {}))
    config = dict(model_path=str(BUNDLED_MODEL), dataset=str(CALIB), dataset_size=48, batch_size=8, max_length=64,
                  output_dir=str(tmp_path / "out"), engine=engine)
    return {**config, **overrides}


@contextmanager
def single_threaded():
    """As each 1-CPU stage actor runs (float32 sums inside a layer depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference(config, sequential: bool):
    """The in-process engine's maps, single-threaded as each 1-CPU stage actor is."""
    ctx = recipe.Context(config, progress=False)
    with single_threaded():
        engine = LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.batches, progress=False)
        return engine.calibrate(BLOCKS, recipe.BlockSolver(config), sequential=sequential)


def distributed(config, sequential: bool):
    ctx = recipe.Context(config, progress=False)
    with closing(recipe.calibration_engine(ctx)) as engine:
        return engine.calibrate(BLOCKS, recipe.BlockSolver(config), sequential=sequential)


def assert_same(expected, got) -> None:
    assert [c.block for c, _ in got] == [c.block for c, _ in expected]
    for (want, t_want), (have, t_have) in zip(expected, got, strict=True):
        assert have.stats.tokens == want.stats.tokens
        for name in ("xtx", "xty"):
            a, b = getattr(want.stats, name), getattr(have.stats, name)
            assert relative(a, b) <= 1e-9, (want.block, name, relative(a, b))
        assert relative(t_want, t_have) <= 1e-9, (want.block, relative(t_want, t_have))
        print(want.block, "T relative difference", relative(t_want, t_have))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("replicas,stages", [(1, 1), (2, 2), (1, 3)])
def test_replicas_and_stages_match_the_in_process_engine(tmp_path, ray_head, replicas, stages):
    config = validate_config(settings(tmp_path, ray_head, engine={"replicas": replicas, "stages": stages}))
    assert_same(reference(config, sequential=True), distributed(config, sequential=True))


@pytest.mark.parametrize("replicas,stages", [(1, 1), (2, 2), (1, 3)])
def test_distances_match_the_in_process_engine(tmp_path, ray_head, replicas, stages):
    config = validate_config(settings(tmp_path, ray_head, engine={"replicas": replicas, "stages": stages}))
    ctx = recipe.Context(config, progress=False)
    with single_threaded():
        expected = LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.batches, progress=False).distances(PROFILED)
    with closing(recipe.calibration_engine(ctx)) as engine:
        got = engine.profile(PROFILED).distances
    assert [(s, e) for s, e, _ in got] == [(s, e) for s, e, _ in expected] == [(s, s + PROFILED) for s in range(1, 11)]
    worst = max(abs(have - want) / want for (*_, want), (*_, have) in zip(expected, got, strict=True))
    print("distances: largest relative difference", worst)
    assert worst <= 1e-12


def test_profile_on_ray_selects_the_blocks_chosen_in_process(tmp_path, ray_head):
    job = write_config(tmp_path / "job.yaml", **settings(
        tmp_path, ray_head, layers_to_skip=3, num_A=2, merge_consecutive=False, engine={"stages": 2}))
    chosen = {}
    for backend in ("local", "ray"):
        out = tmp_path / backend
        overrides = ["--set", f"engine.backend={backend}", "--set", f"output_dir={out}"]
        assert cli.main(["profile", "--config", str(job), "--quiet", *overrides]) == 0
        chosen[backend] = json.loads((out / "blocks.json").read_text()), _read_distances(out)
    (local_blocks, local_distances), (ray_blocks, ray_distances) = chosen["local"], chosen["ray"]
    assert ray_blocks == local_blocks and len(local_blocks) == 2
    assert ray_distances == pytest.approx(local_distances, rel=1e-6)  # (in process on all threads)


def test_a_retried_shard_counts_its_distances_once(tmp_path):
    """On one stage object (no actors): attempt 0 saw one batch before its worker died, attempt 1
    sees the whole shard; finishing attempt 1 returns only its sums and forgets attempt 0."""
    config = dict(model_path=str(BUNDLED_MODEL), dataset=str(CALIB), dataset_size=16, batch_size=8, max_length=64,
                  output_dir=str(tmp_path / "out"))
    ctx = recipe.Context(validate_config(config), progress=False)
    batches = ctx.batches[:2]
    stage = Stage(str(BUNDLED_MODEL), range(ctx.num_layers), device="cpu", dtype="float32")
    stage.set_plan(PhasePlan((), {}, ctx.num_layers, save_rows=False, profile=PROFILED))
    with single_threaded():
        for attempt, seen in ((0, batches[:1]), (1, batches)):
            for batch in seen:
                stage.forward(Payload(0, attempt, batch.input_ids, batch.attention_mask))
        expected = LocalEngine(ctx.layerwise(ctx.checkpoint), batches, progress=False).distances(PROFILED)
    angles = stage.finish_profile(0, 1)  # no candidates' statistics: the angle sums alone
    assert isinstance(angles, AngleSums) and angles.distances() == expected
    with pytest.raises(StageRestarted):  # attempt 0 is gone: it can never be counted
        stage.finish_profile(0, 0)


def _read_distances(out) -> list[float]:
    return [float(line.split(",")[2]) for line in (out / "distances.csv").read_text().splitlines()[1:]]


def test_fit_on_the_unpruned_model_in_one_pass(tmp_path, ray_head):
    config = validate_config(settings(tmp_path, ray_head, engine={"replicas": 2, "stages": 2}))
    assert_same(reference(config, sequential=False), distributed(config, sequential=False))


def assert_identical(expected, got) -> None:
    """Bit for bit: the partials are summed in shard order, whatever happened during the run."""
    assert [c.block for c, _ in got] == [c.block for c, _ in expected]
    for (want, t_want), (have, t_have) in zip(expected, got, strict=True):
        assert have.stats.tokens == want.stats.tokens
        assert have.stats.yty_trace == want.stats.yty_trace, want.block
        assert torch.equal(have.stats.xtx, want.stats.xtx), (want.block, "xtx", relative(want.stats.xtx, have.stats.xtx))
        assert torch.equal(have.stats.xty, want.stats.xty), (want.block, "xty", relative(want.stats.xty, have.stats.xty))
        assert torch.equal(t_have, t_want), (want.block, "T", relative(t_want, t_have))


@contextmanager
def shard_zero_arrives_last(monkeypatch):
    """The shards come back in another order than they were sent: 1, 2, …, 0 (to the profile's
    running sums of the candidates' statistics, too)."""
    from replaceme.distributed.engine import RayEngine

    run_shards = RayEngine._run_shards

    def rotated(self, pipelines, plan, committed, on_done=None):
        held = []
        late_zero = None if on_done is None else (lambda shard: held.append(shard) if shard.index == 0 else on_done(shard))
        done = sorted(run_shards(self, pipelines, plan, committed, on_done=late_zero), key=lambda shard: shard.index)
        for shard in held:
            on_done(shard)
        return done[1:] + done[:1]

    with monkeypatch.context() as patch:
        patch.setattr(RayEngine, "_run_shards", rotated)
        yield


def test_sums_do_not_depend_on_the_order_shards_arrive_in(tmp_path, ray_head, monkeypatch):
    """Maps, distances and the profile's candidate statistics are bit-identical when the shards
    return in another order (6 shards: the pairwise tree groups other partials together if they
    are summed as they arrive)."""
    config = validate_config(settings(tmp_path, ray_head, engine={"batches_per_shard": 1}))
    ctx = recipe.Context(config, progress=False)
    runs = []
    for reorder in (False, True):
        with (shard_zero_arrives_last(monkeypatch) if reorder else nullcontext(),
              closing(recipe.calibration_engine(ctx)) as engine):
            runs.append((engine.profile(PROFILED, statistics=True),
                         engine.calibrate(BLOCKS, recipe.BlockSolver(config), sequential=True)))
    (profiled, fits), (profiled_reordered, fits_reordered) = runs
    assert len(ctx.batches) == 6
    assert profiled_reordered.distances == profiled.distances
    assert profiled.candidates is not None and profiled_reordered.candidates is not None
    assert profiled.candidates.keys() == profiled_reordered.candidates.keys()
    for block, want in profiled.candidates.items():
        have = profiled_reordered.candidates[block]
        assert (have.stats.tokens, have.stats.yty_trace, have.stream_sq) == (
            want.stats.tokens, want.stats.yty_trace, want.stream_sq), block
        assert torch.equal(have.stats.xtx, want.stats.xtx) and torch.equal(have.stats.xty, want.stats.xty), block
    assert_identical(fits, fits_reordered)


def test_distances_are_summed_in_shard_order_not_arrival_order(monkeypatch):
    """The driver's sum of the shards' angle sums (no cluster: the pass is stubbed). Partials
    chosen so that float addition is order-sensitive: 1 + 1e16 - 1e16 is 0 in shard order, 1 if
    shard 0 arrives last."""
    from replaceme.distributed.engine import RayEngine, StageSettings, _Shard
    from replaceme.stats import AngleSums

    engine = object.__new__(RayEngine)
    engine.settings = StageSettings("unused", {"num_hidden_layers": 4}, "cpu", "float32")
    engine.seconds = {"start_workers": 0.0, "passes": 0.0}
    partials = [1.0, 1e16, -1e16]
    arrived = [_Shard(i, [], results=[AngleSums(2, {1: partials[i]}, {1: 1})]) for i in (1, 2, 0)]
    monkeypatch.setattr(engine, "_pipelines_for", lambda layers: [], raising=False)
    monkeypatch.setattr(engine, "_send_plan", lambda pipelines, plan: None, raising=False)
    monkeypatch.setattr(engine, "_run_shards", lambda pipelines, plan, committed, on_done=None: arrived, raising=False)
    assert engine.distances(2)[0] == (1, 3, ((1.0 + 1e16) - 1e16) / 3 / math.pi)


def test_resumed_and_recomputed_shards_sum_as_in_one_run(tmp_path, ray_head):
    """A rerun that recomputes shards 3 and 4 and loads the others from the store gives the first
    run's statistics bit for bit (the recomputed shards are not summed first)."""
    store = tmp_path / "store"
    config = validate_config(settings(tmp_path, ray_head, engine={"batches_per_shard": 1},
                                      activations={"uri": f"file://{store}"}, run_id="mixed"))
    first = distributed(config, sequential=True)
    for block in BLOCKS:
        for shard in (3, 4):
            (store / "mixed" / "blocks" / f"{block[0]}-{block[1]}" / "shards" / f"{shard:05d}.json").unlink()
    again = distributed(config, sequential=True)
    assert sorted(p.name for p in store.glob("mixed/blocks/3-6/shards/*.json")) == [f"{i:05d}.json" for i in range(6)]
    assert_identical(first, again)


def test_killed_stage_actor_is_restarted_and_its_shard_redone(tmp_path, ray_head):
    store = tmp_path / "store"
    options = dict(engine={"stages": 2, "batches_per_shard": 1}, activations={"uri": f"file://{store}"}, dataset_size=96)
    undisturbed = distributed(validate_config(settings(tmp_path, ray_head, run_id="undisturbed", **options)), sequential=True)
    config = validate_config(settings(tmp_path, ray_head, run_id="kill-test", **options))
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(fits=distributed(config, sequential=True)))
    worker.start()
    victim = _wait_for_commit_then_kill_a_stage(store, worker, ray_head.address)
    worker.join(timeout=300)
    assert victim is not None, "the run finished before a stage could be killed"
    assert "fits" in result, "calibration did not finish after the stage was killed"
    assert_identical(undisturbed, result["fits"])
    assert ray.util.state.get_actor(victim, address=ray_head.address).num_restarts >= 1


def test_rerun_with_the_same_run_id_skips_committed_shards(tmp_path, ray_head, caplog):
    store = tmp_path / "store"
    config = validate_config(settings(tmp_path, ray_head, activations={"uri": f"file://{store}"}, run_id="resume"))
    first = distributed(config, sequential=True)
    shard_record = next(store.glob("resume/blocks/3-6/shards/*.json"))
    stamp = shard_record.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="replaceme"):
        again = distributed(config, sequential=True)
    assert "3 of 3 data shards already committed" in caplog.text
    assert shard_record.stat().st_mtime_ns == stamp  # not recomputed, not rewritten
    assert_same(first, again)


def test_more_stages_than_needed_layers_is_refused(tmp_path, ray_head):
    config = validate_config(settings(tmp_path, ray_head, engine={"stages": 11}))
    with pytest.raises(ReplaceMeError, match="engine.stages: 11 stages but only 10 layers are needed"):
        distributed(config, sequential=True)


def test_unsatisfiable_gpu_request_fails_after_a_bounded_wait(tmp_path, ray_head):
    config = validate_config(settings(tmp_path, ray_head, engine={"gpus_per_stage": 1, "resource_timeout_s": 3}))
    started = time.monotonic()
    with pytest.raises(ReplaceMeError, match=r"did not grant .*1 GPU.* within 3 s"):
        distributed(config, sequential=True)
    assert time.monotonic() - started < 60


def test_unreachable_ray_address_is_one_clear_error(tmp_path, ray_head):
    ray.shutdown()  # connect anew
    config = validate_config(settings(tmp_path, ray_head, engine={"address": "127.0.0.1:1"}))
    with pytest.raises(ReplaceMeError, match="engine.address: cannot reach a Ray cluster at '127.0.0.1:1'"):
        distributed(config, sequential=True)


def _wait_for_commit_then_kill_a_stage(store, worker: threading.Thread, address: str, timeout_s: float = 240):
    """SIGKILL the process of the stage ending the first block right after the first shard commits."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    stages: list = []
    while len(stages) < 2 and time.monotonic() < deadline and worker.is_alive():
        stages = list_actors(address=address, filters=[("class_name", "=", "Stage"), ("state", "=", "ALIVE")],
                             detail=True)
        time.sleep(0.1)
    victim = max(stages, key=lambda a: a.pid)  # the later stage, which holds layer 5 (end of block 3-6)
    while time.monotonic() < deadline and worker.is_alive():
        if any(store.glob("kill-test/blocks/3-6/shards/*.json")):
            os.kill(victim.pid, signal.SIGKILL)
            return victim.actor_id
        time.sleep(0.01)
    return None


def test_calibration_after_profile_reuses_the_stages(tmp_path, ray_head, monkeypatch):
    """`replaceme run` selects blocks, then calibrates: the second pass (sequential fits of two blocks
    need one) runs on the stages the profile started (they hold every layer), and the stages are
    gone once calibration ends."""
    from replaceme.distributed.engine import RayEngine

    started = []
    start = RayEngine._start_pipelines

    def recorded(self, layers):
        started.append(layers)
        return start(self, layers)

    monkeypatch.setattr(RayEngine, "_start_pipelines", recorded)
    config = validate_config(settings(tmp_path, ray_head, layers_to_skip=3, num_A=2, merge_consecutive=False,
                                      engine={"stages": 2}))
    assert config.second_pass_reason is not None
    ctx = recipe.Context(config, progress=False)
    out = recipe.OutputDir(config.output_dir)
    blocks = recipe.profile(ctx, out)
    recipe.calibrate(ctx, out, blocks)
    assert started == [ctx.num_layers] and "engine" not in ctx.__dict__
    assert (tmp_path / "out" / "transforms.safetensors").exists()


def profile_stages(ctx, stages, statistics=True):
    """The profile pass on Stage objects chained in this process (no actors), one shard attempt."""
    n = ctx.num_layers
    blocks = tuple((s, s + PROFILED) for s in range(1, n - PROFILED + 1)) if statistics else ()
    plan = PhasePlan(blocks, {}, n, save_rows=False, profile=PROFILED, weighted=statistics)
    for stage in stages:
        stage.set_plan(plan)
    return plan


def assert_same_candidates(expected, got, tolerance: float) -> None:
    assert got.keys() == expected.keys()
    worst = 0.0
    for block, want in expected.items():
        have = got[block]
        assert have.stats.tokens == want.stats.tokens, block
        differences = {name: relative(getattr(want.stats, name), getattr(have.stats, name)) for name in ("xtx", "xty")}
        differences["yty_trace"] = abs(have.stats.yty_trace - want.stats.yty_trace) / want.stats.yty_trace
        differences["stream_sq"] = abs(have.stream_sq - want.stream_sq) / want.stream_sq
        assert (have.weighted is None) == (want.weighted is None), block
        if want.weighted is not None:  # residual selection's stream-weighted part
            differences.update({f"weighted {name}": relative(getattr(want.weighted, name), getattr(have.weighted, name))
                                for name in ("xtx", "xty")})
        assert max(differences.values()) <= tolerance, (block, differences)
        worst = max(worst, *differences.values())
    print("candidate statistics: largest relative difference", worst)


def test_stages_gather_the_candidates_statistics_of_the_profile_pass(tmp_path):
    """On two stage objects (no actors): the X rows of a candidate open on the first stage travel
    with the window to the stage ending it; a retried shard counts its statistics once."""
    config = dict(model_path=str(BUNDLED_MODEL), dataset=str(CALIB), dataset_size=16, batch_size=8, max_length=64,
                  output_dir=str(tmp_path / "out"))
    ctx = recipe.Context(validate_config(config), progress=False)
    stages = [Stage(str(BUNDLED_MODEL), layers, device="cpu", dtype="float32")
              for layers in (range(0, 5), range(5, ctx.num_layers))]
    plan = profile_stages(ctx, stages)
    with single_threaded():
        for attempt, seen in ((0, ctx.batches[:1]), (1, ctx.batches)):
            for batch in seen:
                payload = Payload(0, attempt, batch.input_ids, batch.attention_mask)
                for stage in stages:
                    payload = stage.forward(payload)
        expected = LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.batches, progress=False).profile(
            PROFILED, statistics=True, weighted=True)
    got: dict[tuple[int, int], CandidateStats] = {}
    angles: AngleSums | None = None
    for stage in stages:
        result = stage.finish_profile(0, 1)
        if isinstance(result, list):
            partial, *stats = result
        else:
            partial, stats = result, []
        assert isinstance(partial, AngleSums)
        got.update(zip(stage.ending_blocks(plan), stats, strict=True))
        if angles is None:
            angles = partial
        else:
            angles += partial
    assert angles is not None
    assert any(s - 1 < 5 <= e - 1 for s, e in got)  # candidates straddling the stage boundary
    assert angles.distances() == expected.distances
    assert_same_candidates(expected.candidates, got, tolerance=0.0)
    with pytest.raises(StageRestarted):  # attempt 0 is gone: it can never be counted
        stages[1].finish_profile(0, 0)
    stages[0].plan = None  # as a restart after the shard's forward leaves it: the driver redoes the shard
    with pytest.raises(StageRestarted):
        stages[0].finish_shard(0, 1)


def test_profile_statistics_match_the_in_process_engine(tmp_path, ray_head):
    """R=2 × S=2: every candidate's statistics from the profile pass itself, summed over three shards
    on the stage actors, equal the in-process engine's to float64 round-off."""
    from replaceme.distributed.engine import RayEngine, split_layers

    config = validate_config(settings(tmp_path, ray_head, engine={"replicas": 2, "stages": 2}))
    ctx = recipe.Context(config, progress=False)
    with single_threaded():
        expected = LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.batches, progress=False).profile(
            PROFILED, statistics=True, weighted=True)
    with closing(recipe.calibration_engine(ctx)) as engine:
        got = engine.profile(PROFILED, statistics=True, weighted=True)
    boundary = split_layers(ctx.checkpoint.config, ctx.num_layers, 2)[1].start
    assert got.candidates is not None
    assert any(s - 1 < boundary <= e - 1 for s, e in got.candidates)  # some straddle the stage boundary
    assert isinstance(engine, RayEngine) and len(engine.shards) == 3
    assert [b[:2] for b in got.distances] == [b[:2] for b in expected.distances]
    worst = max(abs(have - want) / want
                for (*_, want), (*_, have) in zip(expected.distances, got.distances, strict=True))
    assert worst <= 1e-12
    assert_same_candidates(expected.candidates, got.candidates, tolerance=1e-9)


def test_run_on_ray_selects_and_fits_in_one_pass(tmp_path, ray_head, monkeypatch):
    """`replaceme run` with blocks chosen by residual (the default selection): the Ray profile pass is the
    only pass over the calibration set (calibrate solves from its statistics), with the residuals,
    blocks and maps of a local run."""
    from safetensors.torch import load_file

    from replaceme.blocks import residuals_from_csv
    from replaceme.distributed.engine import RayEngine

    passes = []
    run_shards = RayEngine._run_shards

    def counted(self, pipelines, plan, *a, **k):
        passes.append(plan.profile)
        return run_shards(self, pipelines, plan, *a, **k)

    monkeypatch.setattr(RayEngine, "_run_shards", counted)
    monkeypatch.setattr(RayEngine, "calibrate", lambda *a, **k: pytest.fail("a second pass over the calibration set"))
    fits = {}
    for backend in ("ray", "local"):
        config = validate_config(settings(
            tmp_path, ray_head, layers_to_skip=3, num_A=2, merge_consecutive=False, sequential=False,
            save_transform_only=True, mlflow={"enabled": False}, output_dir=str(tmp_path / backend),
            engine={"backend": backend, "stages": 2, "replicas": 2}))
        with single_threaded() if backend == "local" else nullcontext():
            result = recipe.run(config, progress=False)
        fits[backend] = result["blocks"], load_file(tmp_path / backend / "transforms.safetensors")
    assert passes == [3]  # one pass over the calibration set, the profile's
    (ray_blocks, ray_maps), (local_blocks, local_maps) = fits["ray"], fits["local"]
    assert ray_blocks == local_blocks and len(ray_blocks) == 2
    residuals = {b: residuals_from_csv((tmp_path / b / "distances.csv").read_text(), b) for b in fits}
    assert residuals["ray"] is not None and residuals["local"] is not None
    assert residuals["ray"].keys() == residuals["local"].keys()
    assert all(residuals["ray"][k] == pytest.approx(v, rel=1e-6) for k, v in residuals["local"].items())
    assert json.loads((tmp_path / "ray" / "selection.json").read_text())["criterion"] == "residual"
    assert ray_maps.keys() == local_maps.keys()
    for name, want in local_maps.items():  # float32 maps solved from float64 sums added in another order
        assert relative(want, ray_maps[name]) <= 1e-6, name


def test_profile_measures_distances_only_when_the_statistics_do_not_fit(tmp_path, monkeypatch, caplog):
    """A stage whose device cannot hold its candidates' statistics for the shards in flight says so,
    and the profile pass then gathers none (no cluster: the actor is this process's stage object)."""
    from types import SimpleNamespace

    from replaceme.config import EngineConfig
    from replaceme.distributed import stage as stage_module
    from replaceme.distributed.engine import RayEngine, StageSettings, _Pipeline

    stage = Stage(str(BUNDLED_MODEL), range(16), device="cpu", dtype="float32")
    blocks = tuple((s, s + PROFILED) for s in range(1, 11))
    assert stage.statistics_room(blocks, 2) is None
    monkeypatch.setattr(stage_module, "free_bytes", lambda device: 2**20)
    room = stage.statistics_room(blocks, 2)
    assert room is not None and room.startswith("layers 0-15 would hold 10 candidates' statistics for 2 shards")
    engine = object.__new__(RayEngine)
    engine.ray = SimpleNamespace(get=lambda refs: refs)
    engine.engine = EngineConfig(backend="ray")
    engine.settings = StageSettings("unused", json.loads((BUNDLED_MODEL / "config.json").read_text()), "cpu", "float32")
    actor = SimpleNamespace(statistics_room=SimpleNamespace(remote=stage.statistics_room))
    with caplog.at_level("WARNING", logger="replaceme"):
        assert engine._statistics_blocks([_Pipeline(None, [(actor, range(16))])], PROFILED, 16, True) == ()
    assert "not gathering the 10 candidate blocks' statistics in the profile pass (layers 0-15" in caplog.text


def test_a_stage_killed_during_the_profile_pass_loses_no_candidate_statistics(tmp_path, ray_head, monkeypatch):
    """A stage actor killed after the first shard's candidate statistics reached it: the actor
    restarts, the shards it held are redone, and the partials already summed survive it (they live
    in the object store, not in the actor): the run still selects by residual and fits in one pass,
    with the residuals and blocks of an in-process run."""
    from replaceme.blocks import residuals_from_csv
    from replaceme.distributed import engine as engine_module

    add = engine_module._ShardOrderFold.add
    killed = []

    def add_then_kill(self, shard):
        add(self, shard)
        if not killed and self.totals:
            victim = next(iter(self.reducers.values()))
            ray.kill(victim, no_restart=False)
            killed.append(victim)

    monkeypatch.setattr(engine_module._ShardOrderFold, "add", add_then_kill)
    monkeypatch.setattr(engine_module.RayEngine, "calibrate", lambda *a, **k: pytest.fail("a second pass"))
    results = {}
    for backend in ("ray", "local"):
        config = validate_config(settings(tmp_path, ray_head, layers_to_skip=3, save_transform_only=True,
                                          mlflow={"enabled": False}, output_dir=str(tmp_path / backend),
                                          engine={"backend": backend, "stages": 2, "replicas": 1}))
        with single_threaded() if backend == "local" else nullcontext():
            blocks = recipe.run(config, progress=False)["blocks"]
        results[backend] = blocks, residuals_from_csv((tmp_path / backend / "distances.csv").read_text(), backend)
    assert killed, "no stage was killed"
    assert json.loads((tmp_path / "ray" / "selection.json").read_text())["criterion"] == "residual"
    (ray_blocks, ray_residuals), (local_blocks, local_residuals) = results["ray"], results["local"]
    assert ray_blocks == local_blocks
    assert ray_residuals is not None and local_residuals is not None
    assert all(ray_residuals[b] == pytest.approx(v, rel=1e-6) for b, v in local_residuals.items())
