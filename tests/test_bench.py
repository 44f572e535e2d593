"""The benchmarks run (smallest settings) and print the JSON they promise. They call the model's
internals (layers, RoPE), so a change there must not silently break them."""
import json
import math
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
    floors = report["matmul_floor_by_weight_layout"]   # the floor is the faster of both layouts
    assert set(floors) == {"linear", "transposed"}
    assert report["matmul_floor_ms_per_token"] == min(floors.values())


TRAIN_ROWS = {"v1_original", "ours_live_all_trained", "ours_cached_all_trained", "ours_default_projector_only"}
CACHED_TRAIN_ROWS = {"ours_cached_all_trained", "ours_default_projector_only"}


def check_bench_train_report(report, device):
    """Structure only: every row timed and positive, FLOP and memory figures present (no timing
    thresholds: the machines running this are shared)."""
    results = report["results"]
    assert set(results) == TRAIN_ROWS
    for name, row in results.items():
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0, name
        assert len(row["step_s"]) == report["steps"] and row["vs_v1"] > 0, name
        assert row["peak_memory_mib"] > 0 and math.isfinite(row["last_loss"]), name
    assert results["v1_original"]["vs_v1"] == 1.0
    assert results["ours_default_projector_only"]["trained_params_m"] < results["ours_live_all_trained"]["trained_params_m"]
    assert report["gemm_peak_gflops"] > 0 and report["useful_gflops_counting"]
    for name in CACHED_TRAIN_ROWS:
        assert results[name]["useful_gflops"] > 0 and results[name]["gemm_fraction"] > 0, name
        # The step's matmuls, recorded and replayed alone: 8 layers x (qkv, wo, gate/up, w2) forward
        # and their input gradients at least (the projector-only row trains no decoder weight).
        assert results[name]["matmul_calls_per_step"] >= 8 * 4 * 2, name
        assert results[name]["matmuls_alone_gemm_fraction"] > 0, name
        assert 0 < results[name]["matmuls_alone_share_of_step"], name
        assert ("mfu" in results[name]) == (device == "cuda"), name
    assert report["v1_positions_per_sample"] == 511       # v1 padded every sample to max_seq_len 512


def test_bench_train_runs():
    report = run_bench("bench_train.py", "--steps", "1", "--samples", "4", "--batch_size", "2")
    check_bench_train_report(report, "cpu")


@pytest.mark.cuda
def test_bench_train_runs_on_cuda():
    report = run_bench("bench_train.py", "--device", "cuda", "--steps", "1", "--samples", "4", "--batch_size", "2")
    check_bench_train_report(report, "cuda")
    assert all(0 < report["results"][name]["mfu"] < 1 for name in CACHED_TRAIN_ROWS)


def test_cuda_check_steps_parse():
    """The prepared GPU run (bench/cuda_check.py) parses each bench step's arguments with that
    bench's own parser before a GPU is ever lent: a wrong flag fails here."""
    report = run_bench("cuda_check.py", "--dry_run")
    assert set(report["steps"]) == {"cuda_tests", "bench_train", "bench_generate"}
    assert "--device cuda" in report["steps"]["bench_train"]["cuda"]
