"""The Ray engine against the in-process engine, on a real Ray head on loopback.

R replicas × S stages must give the same statistics and maps as one process, to float64
round-off (the partial sums are only added in another order); a stage actor killed mid-run is
restarted and its shard re-run, with the same result; a rerun resumes from committed shards.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from conftest import BUNDLED_MODEL, CALIB
from replaceme import recipe
from replaceme.config import validate_config
from replaceme.engine import LocalEngine
from replaceme.errors import ReplaceMeError

ray = pytest.importorskip("ray")

BLOCKS = [(3, 6), (8, 10)]


def settings(tmp_path, head, **overrides) -> dict:
    engine = {"backend": "ray", "address": head.address, "batches_per_shard": 2, "resource_timeout_s": 60}
    engine.update(overrides.pop("engine", {}))
    config = dict(model_path=str(BUNDLED_MODEL), dataset=str(CALIB), dataset_size=48, batch_size=8, max_length=64,
                  output_dir=str(tmp_path / "out"), engine=engine)
    return {**config, **overrides}


def reference(config, sequential: bool):
    """The in-process engine's maps, single-threaded as each 1-CPU stage actor is."""
    ctx = recipe.Context(config, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.batches, progress=False)
        return engine.calibrate(BLOCKS, recipe.BlockSolver(config), sequential=sequential)
    finally:
        torch.set_num_threads(threads)


def distributed(config, sequential: bool):
    ctx = recipe.Context(config, progress=False)
    return recipe.calibration_engine(ctx).calibrate(BLOCKS, recipe.BlockSolver(config), sequential=sequential)


def assert_same(expected, got) -> None:
    assert [c.block for c, _ in got] == [c.block for c, _ in expected]
    for (want, t_want), (have, t_have) in zip(expected, got):
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


def test_fit_on_the_unpruned_model_in_one_pass(tmp_path, ray_head):
    config = validate_config(settings(tmp_path, ray_head, engine={"replicas": 2, "stages": 2}))
    assert_same(reference(config, sequential=False), distributed(config, sequential=False))


def test_killed_stage_actor_is_restarted_and_its_shard_redone(tmp_path, ray_head):
    store = tmp_path / "store"
    config = validate_config(settings(tmp_path, ray_head, engine={"stages": 2, "batches_per_shard": 1},
                                      activations={"uri": f"file://{store}"}, run_id="kill-test", dataset_size=96))
    expected = reference(config, sequential=True)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(fits=distributed(config, sequential=True)))
    worker.start()
    victim = _wait_for_commit_then_kill_a_stage(store, worker, ray_head.address)
    worker.join(timeout=300)
    assert victim is not None, "the run finished before a stage could be killed"
    assert "fits" in result, "calibration did not finish after the stage was killed"
    assert_same(expected, result["fits"])
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
    stages = []
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
