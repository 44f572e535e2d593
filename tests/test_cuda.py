"""The CUDA path users train on: bf16 autocast training steps, the feature cache on the GPU,
generation, and DDP over nccl. Skipped (with the reason) where there is no GPU, as in CI."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, common, losses, make_data, reference_inputs, reference_vlm, run_stage

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), n=32)


def test_bf16_training_steps_learn_like_fp32(tmp_path, data, tiny_clip_dir):
    steps = ("--from_scratch", "--max_steps", "6")
    run_stage("pretrain", common(data, tiny_clip_dir, tmp_path / "cpu", *steps, "--device", "cpu"))
    run_stage("pretrain", common(data, tiny_clip_dir, tmp_path / "gpu", *steps, "--device", "cuda",
                                 "--dtype", "bfloat16"))
    cpu, gpu = losses(tmp_path / "cpu" / "64_vlm_pretrain.pth"), losses(tmp_path / "gpu" / "64_vlm_pretrain.pth")
    assert all(math.isfinite(x) for x in gpu) and gpu[-1] < gpu[0]
    assert gpu == pytest.approx(cpu, rel=5e-2)      # bf16 rounding, same data and init


def test_feature_cache_on_the_gpu_matches_live(tmp_path, data, tiny_clip_dir):
    steps = ("--from_scratch", "--max_steps", "4", "--device", "cuda")
    run_stage("pretrain", common(data, tiny_clip_dir, tmp_path / "live", *steps))
    run_stage("pretrain", common(data, tiny_clip_dir, tmp_path / "cached", *steps, "--cache_features"))
    assert losses(tmp_path / "cached" / "64_vlm_pretrain.pth") == pytest.approx(
        losses(tmp_path / "live" / "64_vlm_pretrain.pth"), rel=2e-2)
    (folder,) = (tmp_path / "cached" / "feature_cache").iterdir()
    assert len(np.load(folder / "keys.npy")) == 32


def test_generation_on_the_gpu_gives_the_pinned_answers(tmp_path):
    with open(os.path.join(ROOT, "tests", "data", "greedy_reference.json"), encoding="utf-8") as f:
        expected = json.load(f)
    model = reference_vlm(tmp_path).to("cuda")
    for name, case in reference_inputs()["generate"].items():
        on_gpu = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in case.items()}
        tokens = model.generate(on_gpu.pop("input_ids"), max_new_tokens=24, eos_token_id=-1, **on_gpu)
        assert tokens.cpu().tolist() == expected[name], name


@pytest.mark.parametrize("compile", [False, True], ids=["cuda_graph", "compiled_cuda_graph"])
def test_cuda_graph_decoding_gives_the_eager_tokens(tmp_path, compile):
    """The decoding step replayed as a CUDA graph (also compiled), over enough tokens that the
    cache grows and the graph is captured again: the tokens of eager decoding, and the pinned ones."""
    with open(os.path.join(ROOT, "tests", "data", "greedy_reference.json"), encoding="utf-8") as f:
        expected = json.load(f)
    model = reference_vlm(tmp_path).to("cuda")
    for name, case in reference_inputs()["generate"].items():
        on_gpu = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in case.items()}
        input_ids = on_gpu.pop("input_ids")
        model.compile_decoding(False, False)
        eager = model.generate(input_ids, max_new_tokens=80, eos_token_id=-1, **on_gpu)
        model.compile_decoding(compile, True)
        replayed = model.generate(input_ids, max_new_tokens=80, eos_token_id=-1, **on_gpu)
        assert torch.equal(replayed, eager), name
        assert replayed[:, :24].cpu().tolist() == expected[name], name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over nccl needs two GPUs")
def test_ddp_over_nccl_matches_one_gpu(tmp_path, data, tiny_clip_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = os.path.join(ROOT, "1-pretrain_vlm.py")
    one = [sys.executable, script, *common(data, tiny_clip_dir, tmp_path / "one", "--from_scratch",
                                           "--max_steps", "4", "--batch_size", "8", "--dtype", "float32")]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
           *common(data, tiny_clip_dir, tmp_path / "two", "--from_scratch", "--max_steps", "4", "--dtype", "float32")]
    for cmd in (one, two):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "two" / "64_vlm_pretrain.pth") == pytest.approx(
        losses(tmp_path / "one" / "64_vlm_pretrain.pth"), rel=1e-3)
