"""bench/bench_data.py runs at its smoke size and prints the JSON it promises. No timing is
asserted (the machine is shared): only that every figure is there and positive."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow

SOURCES = ("parquet", "jsonl")
WORKERS = (0, 2)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("bench_data")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_data.py"),
                           "--rows", "2000", "--samples", "64", "--warmup", "32",
                           "--work_dir", str(work_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_machine_and_data_are_described(report):
    machine = report["machine"]
    assert machine["cpu_count"] > 0 and machine["cpu"]   # which CPU: hosts differ between days
    assert machine["load_average_1min_start"] >= 0 and machine["load_average_1min_end"] >= 0
    data = report["data"]
    assert data["rows"] == 2000 and data["row_group_size"] > 0 and data["picture_px"] > 0
    assert 0 < data["distinct_pictures"] < data["rows"]          # rows share pictures
    assert 0 < data["text_only_rows"] < data["rows"] // 4          # ~8% text-only
    assert all(seconds >= 0 for seconds in data["build_s"].values())
    assert set(data["build_s"]) >= {"parquet", "jsonl", "folder"}
    assert data["small_rows"] == 1000 and data["epoch_rows"] == 2000   # the epoch: all 2000 rows here
    assert all(size > 0 for size in data["bytes"].values())


def test_index_figures(report):
    for source in SOURCES:
        index = report["index"][source]
        assert index["rows_in_use"] == 2000 and index["load_problems"] == 0
        assert index["index_build_s"] > 0 and index["rss_baseline_mb"] > 0
        assert index["index_arrays_mb"] > 0
        assert index["pickled_source_kb"] > 0 and index["pickled_dataset_kb"] > 0
        # An RSS delta may be ~0 (the JSONL index of 2000 rows is a few KB), never missing.
        assert isinstance(index["resident_mb_after_index"], (int, float))


def test_throughput_figures(report):
    throughput = report["throughput"]
    assert set(throughput) == {f"{s}_workers{w}" for s in SOURCES for w in WORKERS}
    for result in throughput.values():
        assert result["samples_per_s"] > 0
        assert result["timed_samples"] == 64 and result["skipped"] == 0
    # Parquet with 0 workers counts its row-group decodes.
    assert 0 <= throughput["parquet_workers0"]["row_group_loads"]["lru_miss_rate"] <= 1


def test_targets_are_reported(report):
    targets = report["targets"]
    for source in SOURCES:
        # 2000 rows are too few to extrapolate to 1M: the target is listed, not judged.
        assert targets["index_memory"][source]["met"] is None
    for workers in WORKERS:
        comparison = targets["throughput"][f"workers{workers}"]
        assert comparison["parquet_over_folder"] > 0 and isinstance(comparison["met"], bool)
