"""Activation store throughput: writing and reading (x, y, residual) rows on local files and on S3.

Writes random float32 activations shaped like a 7B model's (hidden 4096) through
``ActivationStore.row_writer`` — the path a calibration worker takes — to a ``file://`` folder and
to a moto S3 server that this script starts on 127.0.0.1 (``python -m moto.server``, started as the tests start it; dummy
credentials, stopped at the end; the endpoint goes in through the store's ``endpoint_url``), then
reads every row back with ``iter_rows`` with and without ``verify``. Each measurement is repeated
(the two stores alternate, a fresh run id each time) and the median reported, with the bytes per
token row on disk against raw float16 and float32. In-memory ceilings (Parquet encode/decode of
the same columns, SHA-256) are measured alongside to show what bounds each figure.

    python benchmarks/activation_store.py [--shards 2] [--rows 4096] [--hidden 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _record import machine, record, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' loopback S3 server
from s3_server import CLEARED, start_server, stop_server

BLOCK = (8, 12)
CHUNK_ROWS = 1024  # tokens per write() call, as one calibration micro-batch (e.g. 4 × 256 tokens)
MB = 2**20


# --- S3 credentials ------------------------------------------------------------------------------

def dummy_credentials() -> None:
    """Credentials that can reach nothing real; endpoints and profiles from the environment are dropped."""
    for name in CLEARED:
        os.environ.pop(name, None)
    os.environ.update(AWS_ACCESS_KEY_ID="benchmark-access-key", AWS_SECRET_ACCESS_KEY="benchmark-secret",
                      AWS_DEFAULT_REGION="us-east-1")


# --- memory ----------------------------------------------------------------------------------------

def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; returns the current RSS in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return float("nan")
    return _status_mb("VmRSS")


def cpu_seconds() -> tuple[float, float]:
    """This process's user and system CPU seconds so far (the moto server's are not in them)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


# --- the measured passes ---------------------------------------------------------------------------

def stand_in_stats(tokens: int):
    """commit_shard needs statistics counting the part's rows; a real shard's are 2 × hidden² float64
    (256 MiB at hidden 4096). A 1×1 stand-in keeps this benchmark about the rows."""
    from replaceme.stats import BlockStats

    return BlockStats(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64), tokens=tokens)


def write_pass(store, pool: list, shards: int, rows: int, hidden: int) -> dict:
    rows_seconds = commit_seconds = user = system = 0.0
    parts = []
    before = reset_peak()
    for shard in range(shards):
        cpu = cpu_seconds()
        started = time.perf_counter()
        with store.row_writer(BLOCK, shard) as writer:
            written = 0
            while written < rows:
                x, y, residual = pool[(shard + written // CHUNK_ROWS) % len(pool)]
                n = min(CHUNK_ROWS, rows - written)
                writer.write(x[:n], y[:n], residual[:n])
                written += n
        part = writer.close()  # closed by the with block; returns the same description again
        rows_seconds += time.perf_counter() - started
        user, system = user + cpu_seconds()[0] - cpu[0], system + cpu_seconds()[1] - cpu[1]
        started = time.perf_counter()
        store.commit_shard(BLOCK, shard, stand_in_stats(part["rows"]), part)
        commit_seconds += time.perf_counter() - started
        parts.append(part)
    started = time.perf_counter()
    store.write_manifest(BLOCK, hidden, expected_shards=shards)
    commit_seconds += time.perf_counter() - started
    return {"seconds": rows_seconds, "user": user, "system": system, "commit_seconds": commit_seconds,
            "bytes": sum(p["bytes"] for p in parts), "rows": sum(p["rows"] for p in parts),
            "peak_added_mb": _status_mb("VmHWM") - before}


def verify_pass(store) -> dict:
    cpu = cpu_seconds()
    started = time.perf_counter()
    store.verify(BLOCK)
    seconds = time.perf_counter() - started
    user, system = (after - before for after, before in zip(cpu_seconds(), cpu, strict=True))
    return {"seconds": seconds, "user": user, "system": system}


def read_pass(store, verify: bool, expected_rows: int, first_chunk) -> dict:
    cpu = cpu_seconds()
    started = time.perf_counter()
    total, first = 0, None
    for x, y, residual in store.iter_rows(BLOCK, verify=verify):
        first = (x, y, residual) if first is None else first
        total += x.shape[0]
    seconds = time.perf_counter() - started
    user, system = (after - before for after, before in zip(cpu_seconds(), cpu, strict=True))
    if total != expected_rows:
        raise RuntimeError(f"read {total} rows back, wrote {expected_rows}")
    n = min(CHUNK_ROWS, first[0].shape[0])
    for got, wrote in zip(first, first_chunk, strict=True):  # the rows come back as float16-rounded float32
        if not torch.equal(got[:n], wrote[:n].half().float()):
            raise RuntimeError("rows read back differ from the rows written")
    return {"seconds": seconds, "user": user, "system": system}


# --- in-memory ceilings ----------------------------------------------------------------------------

def ceilings(pool: list, hidden: int, rows: int) -> dict:
    """One measurement of each CPU stage in memory (no file, no network), in MB/s of float16 row data:
    the writer's float16 conversion with its finite check, Parquet encode (the store's settings, and
    with pyarrow's default page statistics for comparison), Parquet decode with the conversion to float32 tensors, SHA-256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from replaceme.activations import COLUMNS, RowWriter, _to_arrow, _to_tensor

    nbytes = 3 * rows * hidden * 2
    chunks = [pool[i % len(pool)] for i in range(-(-rows // CHUNK_ROWS))]
    converter = RowWriter(None, BLOCK, "unused")  # _half needs only the block, for its message

    started = time.perf_counter()
    [[t.to(torch.float16) for t in chunk] for chunk in chunks]
    convert_seconds = time.perf_counter() - started
    started = time.perf_counter()
    halves = [[converter._half(name, t) for name, t in zip(COLUMNS, chunk, strict=True)] for chunk in chunks]
    half_seconds = time.perf_counter() - started
    half_bytes = sum(t.numel() * 2 for chunk in halves for t in chunk)
    data = pa.table({name: _to_arrow(torch.cat([chunk[i] for chunk in halves])[:rows]) for i, name in enumerate(COLUMNS)})

    def encode(**options) -> tuple[float, bytes]:
        buffer = io.BytesIO()
        started = time.perf_counter()
        with pq.ParquetWriter(buffer, data.schema, use_dictionary=False, **options) as writer:
            writer.write_table(data, row_group_size=rows)
        return time.perf_counter() - started, buffer.getvalue()

    encode_seconds, raw = encode(write_statistics=False)  # as the store's RowWriter writes
    stats_seconds = encode()[0]
    started = time.perf_counter()
    for batch in pq.ParquetFile(io.BytesIO(raw)).iter_batches(batch_size=8192, columns=list(COLUMNS)):
        [_to_tensor(batch.column(name), hidden) for name in COLUMNS]
    decode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    hashlib.sha256(raw).digest()
    sha_seconds = time.perf_counter() - started
    return {"convert": half_bytes / MB / convert_seconds, "half": half_bytes / MB / half_seconds, "encode": nbytes / MB / encode_seconds,
            "encode_stats": nbytes / MB / stats_seconds, "decode": nbytes / MB / decode_seconds,
            "sha256": len(raw) / MB / sha_seconds}


# --- main ------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096, help="token rows per shard")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool", type=int, default=3, help=f"distinct random chunks of {CHUNK_ROWS} rows cycled")
    parser.add_argument("--no-record", action="store_true", help="print the tables only")
    args = parser.parse_args()
    dummy_credentials()

    import boto3
    import fsspec
    import moto
    import pyarrow
    import s3fs

    from replaceme.activations import ActivationStore

    wall = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    # float32, as a CPU calibration hands them over; heavier-tailed than a plain normal like real
    # residual streams, well inside float16's range
    pool = [tuple(torch.randn(CHUNK_ROWS, args.hidden, generator=generator)
                  * torch.rand(1, args.hidden, generator=generator).mul(4).add(0.25) for _ in range(3))
            for _ in range(args.pool)]

    server = start_server()
    endpoint = server.endpoint_url
    scratch = Path(tempfile.mkdtemp(prefix="activation-store-"))
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="activations")
        backends = {"local file://": (f"file://{scratch}", None), "moto S3 (loopback)": ("s3://activations", endpoint)}
        results: dict[str, dict[str, list]] = {name: {"write": [], "read_first": [], "verify": [], "read_verify": [], "read": []} for name in backends}
        expected = args.shards * args.rows
        ceiling_rows, stages = min(args.rows, 2048), []
        for uri, endpoint_url in backends.values():  # warm-up, not timed: first use of pyarrow, s3fs, moto
            store = ActivationStore(uri, "warm-up", endpoint_url=endpoint_url)
            write_pass(store, pool, 1, CHUNK_ROWS, args.hidden)
            read_pass(store, True, CHUNK_ROWS, pool[0])
            store.fs.rm(store._path(""), recursive=True)
        for repeat in range(args.repeats):
            for name, (uri, endpoint_url) in backends.items():
                store = ActivationStore(uri, f"run-{repeat}", endpoint_url=endpoint_url)
                results[name]["write"].append(write_pass(store, pool, args.shards, args.rows, args.hidden))
                # The first read after a write pass runs slower on this VM (kernel time, see below): measured
                # on its own, so that it does not land on whichever of the two compared reads comes first.
                results[name]["read_first"].append(read_pass(store, False, expected, pool[0]))
                results[name]["verify"].append(verify_pass(store))
                results[name]["read_verify"].append(read_pass(store, True, expected, pool[0]))
                results[name]["read"].append(read_pass(store, False, expected, pool[0]))
                store.fs.rm(store._path(""), recursive=True)  # free moto's memory and the disk between repeats
                print(f"repeat {repeat + 1}/{args.repeats} {name}: write {results[name]['write'][-1]['seconds']:.2f} s, "
                      f"first read {results[name]['read_first'][-1]['seconds']:.2f} s, "
                      f"read verify {results[name]['read_verify'][-1]['seconds']:.2f} s, "
                      f"read {results[name]['read'][-1]['seconds']:.2f} s", flush=True)
            stages.append(ceilings(pool, args.hidden, ceiling_rows))  # under the same load as this repeat
    finally:
        stop_server(server.process)
        fsspec.filesystem("file").rm(str(scratch), recursive=True)
    wall = time.perf_counter() - wall

    part_bytes = statistics.median(w["bytes"] for r in results.values() for w in r["write"])
    mb = part_bytes / MB
    per_row = part_bytes / expected
    raw16, raw32 = 3 * args.hidden * 2, 3 * args.hidden * 4

    def cells(runs: list) -> list:
        seconds = [r["seconds"] for r in runs]
        median = statistics.median(seconds)
        return [f"{median:.2f}", f"{min(seconds):.2f}–{max(seconds):.2f}", f"{mb / median:.0f}", f"{expected / median:,.0f}",
                f"{statistics.median(r['user'] for r in runs):.2f}", f"{statistics.median(r['system'] for r in runs):.2f}"]

    headers = ["store", "operation", "s (median)", "s (range)", "MB/s", "token rows/s", "user CPU s", "sys CPU s"]
    rows = []
    for name, runs in results.items():
        rows.append([name, "write rows (write + close)", *cells(runs["write"])])
        rows.append([name, "first read after the write (`verify=False`)", *cells(runs["read_first"])])
        rows.append([name, "`verify()` alone (sizes + SHA-256 of every part)", *cells(runs["verify"])])
        rows.append([name, "read `iter_rows(verify=True)`", *cells(runs["read_verify"])])
        rows.append([name, "read `iter_rows(verify=False)`", *cells(runs["read"])])
    commit = {name: statistics.median(w["commit_seconds"] for w in runs["write"]) * 1000 for name, runs in results.items()}
    peak = {name: statistics.median(w["peak_added_mb"] for w in runs["write"]) for name, runs in results.items()}
    size_headers = ["format", "bytes per token row per block", "vs raw float16", "GB per block per 1M tokens"]
    size_rows = [["store part (Parquet, float16, snappy)", f"{per_row:,.0f}", f"{per_row / raw16:.4f}", f"{per_row * 1e6 / 1e9:.1f}"],
                 [f"raw float16 (3 × {args.hidden} × 2)", f"{raw16:,}", "1.0000", f"{raw16 * 1e6 / 1e9:.1f}"],
                 [f"raw float32 (3 × {args.hidden} × 4)", f"{raw32:,}", "2.0000", f"{raw32 * 1e6 / 1e9:.1f}"]]
    limit_headers = ["in memory (no file, no network)", "MB/s"]
    limits = {key: statistics.median(stage[key] for stage in stages) for key in stages[0]}
    # one thread does these one after the other for every byte it writes (the file or upload on top)
    cpu_write = 1 / (1 / limits["half"] + 1 / limits["encode"] + 1 / limits["sha256"])
    limit_rows = [["float32 → float16 alone (`Tensor.to`, for comparison)", f"{limits['convert']:.0f}"],
                  ["float32 → float16 with the finite check (`RowWriter._half`)", f"{limits['half']:.0f}"],
                  [f"Parquet encode, the store's settings ({ceiling_rows} rows)", f"{limits['encode']:.0f}"],
                  ["Parquet encode, same with page statistics (pyarrow's default, for comparison)", f"{limits['encode_stats']:.0f}"],
                  ["SHA-256", f"{limits['sha256']:.0f}"],
                  ["**write path, CPU only** (the three above in series)", f"**{cpu_write:.0f}**"],
                  ["Parquet decode + conversion to float32 tensors (`_to_tensor`)", f"{limits['decode']:.0f}"]]
    print(table(headers, rows))
    print(table(size_headers, size_rows))
    print(table(limit_headers, limit_rows))
    print("commit_shard + write_manifest ms:", {k: round(v) for k, v in commit.items()},
          "| peak RSS added by a write pass MB:", {k: round(v) for k, v in peak.items()}, f"| total {wall:.0f} s")

    if args.no_record:
        return
    local, s3 = "local file://", "moto S3 (loopback)"
    med = {name: {op: statistics.median(r["seconds"] for r in runs[op]) for op in runs} for name, runs in results.items()}
    rate = {name: {op: mb / seconds for op, seconds in ops.items()} for name, ops in med.items()}
    group_rows = min(args.rows, 8192)
    cpu = {name: {op: {kind: statistics.median(r[kind] for r in runs[op]) for kind in ("user", "system")} for op in runs}
           for name, runs in results.items()}
    ratio = rate[local]["write"] / cpu_write
    storage_share = ("the same within this machine's noise, so the local file adds next to nothing" if ratio > 0.8 else
                     f"{1 - ratio:.0%} less, the rest being the file write and the writer's buffering")
    gaps = {name: med[name]["read_verify"] - med[name]["verify"] - med[name]["read"] for name in med}
    verify_gap = " ".join(
        f"On {'moto' if name == s3 else 'local files'} the `verify=True` read took {gap:.2f} s more than `verify()` plus the plain "
        f"read, with {cpu[name]['read_verify']['system'] - cpu[name]['verify']['system'] - cpu[name]['read']['system']:.2f} s "
        "more kernel time: after the hashing pass releases its buffers, the read faults its memory in anew, "
        "as the first read after a write does (above)."
        for name, gap in gaps.items() if gap > 0.3) or "The two read rows differ by about that."
    row_groups = "one row group" if args.rows <= 8192 else f"{-(-args.rows // 8192)} row groups"
    record("Activation store throughput", f"""
`python benchmarks/activation_store.py` — random float32 activations shaped like a 7B model's
(hidden {args.hidden}) for one block: {args.shards} shards × {args.rows} token rows, written through
`ActivationStore.row_writer` in `write()` calls of {CHUNK_ROWS} rows (one calibration micro-batch) with the
default `row_group_rows` (8192, so each part is {row_groups}), committed and sealed with
`write_manifest`, then read back whole with `iter_rows` (batches of 8192 rows, float32): once right
after the write, then `verify()` alone, then with `verify=True`, then with `verify=False`. {mb:.0f} MB of Parquet per pass
(MB = 2^20 bytes). Two stores side by side: a `file://` folder on the local disk (ext4), and a moto
S3 server (`python -m moto.server`, moto {moto.__version__}) that the benchmark starts on 127.0.0.1 and
reaches through the store's `endpoint_url` (s3fs {s3fs.__version__}; pyarrow {pyarrow.__version__}). Medians of
{args.repeats} runs after an untimed warm-up pass; the stores alternate, each run under a fresh run id,
deleted afterwards. MB/s counts the Parquet bytes of the parts once, also for `verify=True`, which
reads them twice; CPU seconds are the benchmark process's only (moto's server process is not in
them). Machine: {machine()}, {os.cpu_count()} cores, shared with other work while this ran (hence the
ranges). Whole benchmark: {wall:.0f} s.

{table(headers, rows)}

`commit_shard` (with 1×1 stand-in statistics) and `write_manifest` took {commit[local]:.0f} ms locally and
{commit[s3]:.0f} ms on moto per pass — small JSON objects, not counted above. A real shard's statistics are
2 × {args.hidden}² float64 = {2 * args.hidden**2 * 8 / MB:.0f} MB whatever its row count, more than a {args.rows}-row part ({mb / args.shards:.0f} MB):
they outweigh a shard's rows until it holds 8 × hidden / 3 = {8 * args.hidden / 3:,.0f} rows, so shards should be
large. A write pass added {peak[local]:.0f} MB (local) and {peak[s3]:.0f} MB (S3) to the process's peak RSS: the writer
buffers up to one row group ({group_rows} × 3 × {args.hidden} float16 = {group_rows * raw16 / MB:.0f} MB here, {8192 * raw16 / MB:.0f} MB at 8192 rows),
concatenates it (a second copy) and encodes it; s3fs holds up to one 50 MiB upload block besides.

Size on disk:

{table(size_headers, size_rows)}

Random float16 mantissas do not compress: snappy (pyarrow's default, which the store keeps) saves
nothing, and a part is raw float16 plus {per_row - raw16:.0f} bytes of Parquet framing per row — half of float32.
Real activations compress a little, not much.

What bounds each figure — the CPU stages alone, in memory, measured in every repeat under the same
load (MB/s of float16 row data, medians):

{table(limit_headers, limit_rows)}

* **Writes are CPU-bound in the writer's thread.** Every byte is converted and checked (`_half`),
  Parquet-encoded and hashed, one stage after the other, then written: those stages alone run at
  {cpu_write:.0f} MB/s in memory, and the local write reached {rate[local]['write']:.0f} MB/s ({expected / med[local]['write']:,.0f} token rows/s) — {storage_share}. Encoding
  a `fixed_size_list<float16>` column costs per value (list levels; the store skips the min/max
  statistics pyarrow computes for every page by default, with which the encode alone drops from {limits['encode']:.0f} to {limits['encode_stats']:.0f} MB/s). The finite check
  (`torch.isfinite(half).all()` on the float16 copy) makes `_half` {limits['convert'] / limits['half']:.1f}× slower than the bare
  conversion. The local file write lands in the page cache (no fsync; the kernel writes back
  later), so it measures the CPU path, not the disk.
* **S3 writes** ({rate[s3]['write']:.0f} MB/s) add the upload, which s3fs does synchronously whenever its 50 MiB buffer
  fills, so encoding stops while a block uploads; the server is moto, one Python process holding
  the objects in memory, on the same {os.cpu_count()} cores as the writer. The S3 figures are a floor for a real
  object store and say nothing about network bandwidth.
* **Local reads** ({rate[local]['read']:.0f} MB/s without `verify`) come from the page cache (the parts were just
  written), so they measure Parquet decoding and the float16 → float32 conversion in `_to_tensor`
  (ceiling {limits['decode']:.0f} MB/s), not the disk; a cold read would add the disk's rate.
* **The first read after a write** took {med[local]['read_first']:.2f} s locally against {med[local]['read']:.2f} s for the same read
  repeated, with {cpu[local]['read_first']['system']:.2f} s of kernel time against {cpu[local]['read']['system']:.2f} s (user {cpu[local]['read_first']['user']:.2f} against {cpu[local]['read']['user']:.2f} s); on moto
  {med[s3]['read_first']:.2f} s against {med[s3]['read']:.2f} s, kernel {cpu[s3]['read_first']['system']:.2f} against {cpu[s3]['read']['system']:.2f} s. The S3 read involves no local
  file, so the extra is most likely the kernel (this VM) supplying anew the memory that the write
  pass had just released, not Parquet or the store; it is measured apart so that it does not land
  on whichever of the two compared reads would come first.
* **`verify=True`** is `verify()` followed by the same read: `verify()` reads every part once to hash
  it, {med[local]['verify']:.2f} s locally (page-cache reads and SHA-256, which alone runs at {limits['sha256']:.0f} MB/s) and
  {med[s3]['verify']:.2f} s on moto, where every byte is thus downloaded twice. {verify_gap}
* **S3 reads** ({rate[s3]['read']:.0f} MB/s without `verify`) are moto serving the objects from Python and s3fs's
  ranged GETs, on the same cores as the decoder.
""")


if __name__ == "__main__":
    main()
