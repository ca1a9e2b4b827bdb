"""The activation store on a local folder and on a real S3-compatible server (moto, loopback),
and the streaming cosine solver that reads it."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from processes import free_port
from replaceme.activations import ActivationStore
from replaceme.errors import ReplaceMeError
from replaceme.solvers import mean_cosine_distance, solve_cosine, solve_cosine_streaming
from replaceme.stats import BlockStats
from s3_server import SECRET_KEY

BLOCK = (2, 5)
HIDDEN = 8
FAST_FAIL = {"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}


def rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, HIDDEN, generator=g) for _ in range(3))


def fill(store: ActivationStore, shards: int = 2, batches: int = 3, n: int = 23):
    """Calibrate like a worker would: stream rows per shard, then commit; returns the rows written."""
    written = []
    for shard in range(shards):
        stats = BlockStats.zeros(HIDDEN)
        with store.row_writer(BLOCK, shard, attempt=0) as writer:
            for batch in range(batches):
                x, y, residual = rows(n, seed=100 * shard + batch)
                writer.write(x, y, residual)
                stats.update(x, y)
                written.append((x, y, residual))
        store.commit_shard(BLOCK, shard, stats, writer.close())
    return [torch.cat(column) for column in zip(*written, strict=True)]


def read_all(store: ActivationStore, batch_rows: int = 16, **kwargs):
    return [torch.cat(column) for column in zip(*store.iter_rows(BLOCK, batch_rows, **kwargs), strict=True)]


def assert_round_trip(store: ActivationStore) -> None:
    store.check()
    expected = fill(pickle.loads(pickle.dumps(store)))  # workers get a pickled copy
    manifest = store.write_manifest(BLOCK, HIDDEN, expected_shards=2)
    assert manifest["rows"] == manifest["tokens"] == expected[0].shape[0]
    for got, want in zip(read_all(store), expected, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)
    total = store.reduce_stats(BLOCK)
    reference = BlockStats.zeros(HIDDEN)
    reference.update(expected[0], expected[1])
    torch.testing.assert_close(total.xtx, reference.xtx)
    assert total.tokens == reference.tokens


@pytest.fixture
def local(tmp_path: Path) -> ActivationStore:
    return ActivationStore(f"file://{tmp_path}/store", "run-1", row_group_rows=10)


def test_local_round_trip_with_bounded_float16_row_groups(local, tmp_path):
    assert_round_trip(local)
    part = tmp_path / "store/run-1/blocks/2-5/rows/shard-00000-0.parquet"
    metadata = pq.ParquetFile(part).metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert sum(sizes) == 69 and max(sizes) <= 10
    schema = pq.read_schema(part)
    for name in ("x", "y", "residual"):
        assert schema.field(name).type == pa.list_(pa.float16(), HIDDEN)
    transform = torch.randn(HIDDEN, HIDDEN)
    assert local.load_transform(BLOCK) is None
    local.save_transform(BLOCK, transform)
    torch.testing.assert_close(local.load_transform(BLOCK), transform)


def test_s3_round_trip_with_endpoint_in_config(s3_server):
    bucket = s3_server.create_bucket("activations")
    assert_round_trip(ActivationStore(f"{bucket}/prefix", "run-cfg", endpoint_url=s3_server.endpoint_url,
                                      row_group_rows=10))
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket="activations")["Contents"]}
    assert "prefix/run-cfg/blocks/2-5/manifest.json" in keys
    assert "prefix/run-cfg/blocks/2-5/shards/00001.json" in keys


def test_s3_round_trip_with_endpoint_from_environment(s3_server, monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an instance made without the variable must not be reused
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    bucket = s3_server.create_bucket("activations-env")
    assert_round_trip(ActivationStore(bucket, "run-env", row_group_rows=10))


def test_resume_bookkeeping(local, tmp_path):
    fill(local, shards=1)
    assert set(local.committed_shards(BLOCK)) == {0}
    record_file = tmp_path / "store/run-1/blocks/2-5/shards/00000.json"
    before = record_file.read_bytes()
    fill(local, shards=1)  # the same shard again (a resumed or duplicated task)
    assert record_file.read_bytes() == before
    assert set(local.committed_shards(BLOCK)) == {0}
    with pytest.raises(ReplaceMeError, match=r"no commit for shards \[1, 2\]"):
        local.write_manifest(BLOCK, HIDDEN, expected_shards=3)
    with pytest.raises(ReplaceMeError, match="has no manifest.*re-run calibration"):
        next(local.iter_rows(BLOCK))


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "flipped":
        middle = len(raw) // 2
        path.write_bytes(raw[:middle] + bytes(b ^ 0xFF for b in raw[middle:middle + 8]) + raw[middle + 8:])
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.unlink()


@pytest.mark.parametrize("how, message", [("flipped", "checksum"), ("truncated", "truncated"), ("missing", "missing")])
def test_damaged_part_is_named(local, tmp_path, how, message):
    fill(local)
    local.write_manifest(BLOCK, HIDDEN)
    damage(tmp_path / "store/run-1/blocks/2-5/rows/shard-00001-0.parquet", how)
    with pytest.raises(ReplaceMeError, match=rf"shard-00001-0\.parquet is unusable: .*{message}.*re-run calibration "
                                             r"for block 2-5"):
        read_all(local)
    if how != "flipped":  # size is checked on every pass, the checksum only when verifying
        with pytest.raises(ReplaceMeError, match=message):
            read_all(local, verify=False)


def test_damaged_part_on_s3(s3_server):
    bucket = s3_server.create_bucket("activations-damaged")
    store = ActivationStore(bucket, "run", endpoint_url=s3_server.endpoint_url, row_group_rows=10)
    fill(store)
    store.write_manifest(BLOCK, HIDDEN)
    client, key = s3_server.client(), "run/blocks/2-5/rows/shard-00000-0.parquet"
    raw = client.get_object(Bucket="activations-damaged", Key=key)["Body"].read()
    client.put_object(Bucket="activations-damaged", Key=key, Body=raw[:-100])
    with pytest.raises(ReplaceMeError, match=rf"{bucket}/{key} is unusable: .*truncated"):
        read_all(store)


@pytest.mark.parametrize("lie, message", [("rows", "holds 69 rows, the manifest says 70"),
                                          ("parquet", "not readable Parquet")])
def test_manifest_and_file_disagree(local, tmp_path, lie, message):
    fill(local)
    manifest_file = tmp_path / "store/run-1/blocks/2-5/manifest.json"
    manifest = local.write_manifest(BLOCK, HIDDEN)
    part = manifest["parts"][0]
    if lie == "rows":
        part["rows"] += 1
    else:  # a file that matches its checksum but is not Parquet
        import hashlib

        garbage = b"not parquet at all" * 10
        (tmp_path / "store/run-1" / part["path"]).write_bytes(garbage)
        part.update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ReplaceMeError, match=message):
        read_all(local)


def test_uncommitted_parts_are_ignored(local, tmp_path):
    expected = fill(local)
    with local.row_writer(BLOCK, 0, attempt=1) as stray:  # a retry that died before committing
        stray.write(*rows(5, seed=9))
    rows_dir = tmp_path / "store/run-1/blocks/2-5/rows"
    (rows_dir / "shard-00007-0.parquet").write_bytes(b"half a file")
    local.write_manifest(BLOCK, HIDDEN)
    assert len(list(rows_dir.iterdir())) == 4
    torch.testing.assert_close(read_all(local)[0], expected[0].half().float())


def test_float16_overflow_and_nan_are_refused(local):
    x, y, residual = rows(4, seed=0)
    big = y.clone()
    big[1, 2] = 70000.0
    with pytest.raises(ReplaceMeError, match=r"block 2-5, column y: .*70000.*65504"):
        local.row_writer(BLOCK, 0).write(x, big, residual)
    residual[0, 0] = float("nan")
    with pytest.raises(ReplaceMeError, match="block 2-5, column residual: holds non-finite"):
        local.row_writer(BLOCK, 0).write(x, y, residual)


def test_endpoint_down_is_one_clear_error(s3_server):
    uri = "s3://activations/down"
    store = ActivationStore(uri, "run", endpoint_url=f"http://127.0.0.1:{free_port()}",
                            options={**FAST_FAIL, "key": "AKIAEXAMPLE", "secret": SECRET_KEY})
    with pytest.raises(ReplaceMeError, match="activations.uri: cannot write to s3://activations/down/run .*"
                                             "endpoint is reachable") as error:
        store.check()
    assert SECRET_KEY not in str(error.value) and SECRET_KEY not in repr(store)
    assert SECRET_KEY not in str(pickle.loads(pickle.dumps(store)))


def test_missing_bucket_is_reported_not_created(s3_server):
    store = ActivationStore("s3://no-such-bucket", "run", endpoint_url=s3_server.endpoint_url)
    with pytest.raises(ReplaceMeError, match="s3://no-such-bucket/run: it does not exist") as error:
        store.check()
    assert SECRET_KEY not in str(error.value)
    buckets = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert "no-such-bucket" not in buckets


def test_no_permission_is_reported(read_only_s3):
    store = ActivationStore(f"s3://{read_only_s3.bucket}", "run", endpoint_url=read_only_s3.server.endpoint_url,
                            options={"key": read_only_s3.key, "secret": read_only_s3.secret})
    with pytest.raises(ReplaceMeError, match="no permission to write to s3://locked/run") as error:
        store.check()
    assert read_only_s3.secret not in str(error.value)


# --- the streaming cosine solver -----------------------------------------------------------------


def problem(n: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, HIDDEN, generator=g)
    truth = torch.eye(HIDDEN) + 0.3 * torch.randn(HIDDEN, HIDDEN, generator=g)
    y = x @ truth + 0.05 * torch.randn(n, HIDDEN, generator=g)
    residual = 2 * torch.randn(n, HIDDEN, generator=g)
    return x, y, residual


def chunks(x, y, residual, size: int = 70):
    return lambda: zip(x.split(size), y.split(size), residual.split(size), strict=True)


@pytest.mark.parametrize("loss, diag", [("cosine", False), ("mse", False), ("cosine", True)])
def test_streaming_lbfgs_equals_in_memory(loss, diag):
    x, y, residual = problem()
    kwargs = dict(init=torch.eye(HIDDEN), loss=loss, solver="lbfgs", diag=diag, steps=25)
    in_memory = solve_cosine(x, y, residual, **kwargs)
    streamed = solve_cosine_streaming(chunks(x, y, residual), hidden=HIDDEN, **kwargs)
    torch.testing.assert_close(streamed, in_memory, rtol=1e-5, atol=1e-5)


def test_streaming_adam_lowers_the_distance_from_the_store(local):
    x, y, residual = problem(seed=1)
    with local.row_writer(BLOCK, 0) as writer:
        writer.write(x, y, residual)
    stats = BlockStats.zeros(HIDDEN)
    stats.update(x, y)
    local.commit_shard(BLOCK, 0, stats, writer.close())
    local.write_manifest(BLOCK, HIDDEN)
    local.verify(BLOCK)
    init = torch.eye(HIDDEN)
    solved = solve_cosine_streaming(lambda: local.iter_rows(BLOCK, 64, verify=False), hidden=HIDDEN, init=init,
                                    solver="adam", steps=40, lr=3e-2, batch_tokens=100, seed=0)
    assert mean_cosine_distance(x, y, residual, solved) < 0.5 * mean_cosine_distance(x, y, residual, init)


def test_streaming_solver_refuses_an_empty_stream():
    with pytest.raises(ReplaceMeError, match="no activation rows"):
        solve_cosine_streaming(lambda: iter(()), hidden=HIDDEN, init=torch.eye(HIDDEN), solver="adam", steps=3)
