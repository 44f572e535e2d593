"""The benchmarks run (smallest settings) and print the JSON they promise. They call the model's
internals (layers, RoPE), so a change there must not silently break them."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def run_bench(name, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_bench_generate_runs_and_all_loops_agree():
    report = run_bench("bench_generate.py", "--repeats", "1", "--new_tokens", "8")
    assert report["same_tokens"] is True           # ours (cache / no cache) and v1: same greedy tokens
    assert report["kv_cache"]["new_tokens"] == 8 and report["matmul_floor_ms_per_token"] > 0


def test_bench_train_runs():
    report = run_bench("bench_train.py", "--steps", "1", "--batch_size", "2")
    results = report["results"]
    assert set(results) == {"ours_live_clip", "ours_cached_features", "v1_baseline_live_clip"}
    assert all(r["samples_per_s"] > 0 for r in results.values())
