"""Progress off a terminal (Ray job logs, pods): periodic log lines with percent, rate and ETA, never `\\r` bars."""

from __future__ import annotations

import logging
import re

from conftest import CALIB, write_config
from replaceme.progress import LogProgress
from user_cli import replaceme_cli


def test_a_run_logs_progress_lines_when_stderr_is_a_pipe(tmp_path, tiny_llama):
    config = write_config(tmp_path / "job.yaml", model_path=str(tiny_llama), dataset=str(CALIB), max_length=32,
                          dataset_size=16, layers_to_skip=2, output_dir=str(tmp_path / "out"))
    result = replaceme_cli("profile", "--config", str(config), env={"REPLACEME_PROGRESS": ""})  # stderr: a pipe
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("INFO profile:") and "ETA" in line]
    assert len(lines) >= 5, result.stderr  # at every 10 % done
    assert re.fullmatch(r"INFO profile: 100% \(\d+/\d+ layer\), [\d.e+]+ layer/s, elapsed \d\d:\d\d, ETA 00:00", lines[-1])
    assert all("%" in line and "layer/s" in line for line in lines)

    quiet = replaceme_cli("profile", "--config", str(config), "--overwrite", "--log-level", "warning")
    assert quiet.returncode == 0 and "INFO" not in quiet.stderr and "\r" not in quiet.stderr


def test_log_progress_every_interval_and_every_tenth(caplog, monkeypatch):
    clock = iter(range(0, 1000, 7))  # seconds: 7 per call
    monkeypatch.setattr("replaceme.progress.time.monotonic", lambda: next(clock))
    with (caplog.at_level(logging.INFO, logger="replaceme.progress"),
          LogProgress(total=1000, desc="calibrate", unit="layer", interval=30) as bar):
        for _ in range(50):
            bar.update()
    messages = [r.getMessage() for r in caplog.records]
    # 50 updates of 1/1000 never reach 10 %: a line every 30 s (5 updates of 7 s), the last one at close
    assert len(messages) == 10 and messages[0].startswith("calibrate:   0% (5/1000 layer), 0.143 layer/s")
    assert messages[-1].startswith("calibrate:   5% (50/1000 layer)") and "ETA 1:50:50" in messages[-1]


def test_log_progress_of_bytes_is_human_readable(caplog):
    with (caplog.at_level(logging.INFO, logger="replaceme.progress"),
          LogProgress(total=4_000_000, desc="merge", unit="B", unit_scale=True, interval=3600) as bar):
        for _ in range(4):
            bar.update(1_000_000)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4 and messages[-1].startswith("merge: 100% (4.00M/4.00M B)")
