"""The CUDA path users train on: bf16 autocast training steps, the feature cache on the GPU,
generation, and DDP over nccl. Skipped (with the reason) where there is no GPU, as in CI."""
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import (ROOT, common, losses, make_data, pinned_reference, reference_prompts, reference_vlm,
                      run_stage, save_tiny_checkpoint, tiny_config)
import model.language as language
from model.vision import VisionEncoder
from model.vlm import MiniMindVLM

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


def test_a_bf16_run_resumes_in_float16(tmp_path, data, tiny_clip_dir):
    """A bf16 run keeps no loss-scaler state; resumed with --dtype float16 it goes on, its
    scaler started afresh, instead of failing on the empty state."""
    out, steps = tmp_path / "run", ("--from_scratch", "--device", "cuda", "--max_steps")
    run_stage("pretrain", common(data, tiny_clip_dir, out, *steps, "2", "--dtype", "bfloat16"))
    run_stage("pretrain", common(data, tiny_clip_dir, out, *steps, "4", "--dtype", "float16", "--resume"))
    assert len(losses(out / "64_vlm_pretrain.pth")) == 4


def test_generation_on_the_gpu_gives_the_pinned_answers(tmp_path):
    expected = pinned_reference()
    model = reference_vlm(tmp_path).to("cuda")
    for name, input_ids, kwargs in reference_prompts("cuda"):
        tokens = model.generate(input_ids, max_new_tokens=24, eos_token_id=-1, **kwargs)
        assert tokens.cpu().tolist() == expected[name], name


@pytest.mark.parametrize("compile", [False, True], ids=["cuda_graph", "compiled_cuda_graph"])
def test_cuda_graph_decoding_gives_the_eager_tokens(tmp_path, compile):
    """The decoding step replayed as a CUDA graph (also compiled, which must not fall back to
    eager), over enough tokens that the cache grows and the graph is captured again: the tokens
    of eager decoding, and the pinned ones."""
    expected = pinned_reference()
    model = reference_vlm(tmp_path).to("cuda")
    for name, input_ids, kwargs in reference_prompts("cuda"):
        model.compile_decoding(False, False)
        eager = model.generate(input_ids, max_new_tokens=80, eos_token_id=-1, **kwargs)
        model.compile_decoding(compile, True)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="torch.compile of the decoding step failed")
            replayed = model.generate(input_ids, max_new_tokens=80, eos_token_id=-1, **kwargs)
        assert torch.equal(replayed, eager), name
        assert replayed[:, :24].cpu().tolist() == expected[name], name


def test_the_chat_model_on_cuda_decodes_through_a_cuda_graph(tmp_path, tiny_clip_dir, monkeypatch):
    """load_model (the CLI's and the web demo's model) replays decoding as a CUDA graph on CUDA
    without --compile: the graph is used, and its tokens are eager's."""
    from model.inference import load_model

    graphs = []

    class CountedGraphStep(language.CUDAGraphStep):
        def __init__(self, *args):
            graphs.append(args)
            super().__init__(*args)

    monkeypatch.setattr(language, "CUDAGraphStep", CountedGraphStep)
    model = load_model(save_tiny_checkpoint(tmp_path / "64_vlm_sft.pth"), tiny_clip_dir, device="cuda")
    input_ids = torch.tensor([[1, 320, 275, 201, 3456, 789, 1234, 2, 201, 1, 1078, 538, 201]], device="cuda")
    replayed = model.generate(input_ids, max_new_tokens=40, eos_token_id=-1)
    assert graphs
    model.compile_decoding(False, False)
    assert torch.equal(model.generate(input_ids, max_new_tokens=40, eos_token_id=-1), replayed)


def test_moe_decoding_asked_for_a_cuda_graph_decodes_as_eager(tiny_clip_dir):
    """An MoE model routes tokens to experts by data, which a CUDA graph cannot capture: asked
    for one (as --compile does), it decodes without, as eager does."""
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(vision_model_path=tiny_clip_dir, use_moe=True),
                        VisionEncoder.from_pretrained(tiny_clip_dir)).eval().to("cuda")
    input_ids = torch.tensor([[1, 320, 275, 201, 3456, 789, 1234, 2, 201, 1, 1078, 538, 201]], device="cuda")
    eager = model.generate(input_ids, max_new_tokens=40, eos_token_id=-1)
    model.compile_decoding(compile=False, cuda_graph=True)
    assert torch.equal(model.generate(input_ids, max_new_tokens=40, eos_token_id=-1), eager)


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
