"""The published v1 weight folders (minimind-v-v1, minimind-v-v1-small) load directly: the
CLI, the web demo's checkpoint list, the trainers' --init_weight and build_vlm take them, strictly,
and their remote code is never run."""
import json
import os

import pytest
import torch

from conftest import common, make_data, published_folder, run_cli, run_stage, save_tiny_checkpoint
from model.checkpoint import CheckpointError, build_vlm, read_state_dict
from model.inference import find_checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("pth") / "64_vlm_sft.pth")


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "model.safetensors"])
def test_folder_loads_key_for_key(tmp_path, checkpoint, tiny_clip_dir, file_name):
    folder = published_folder(tmp_path / "minimind-v-v1-small", checkpoint, file_name)
    expected = torch.load(checkpoint, weights_only=True)
    assert read_state_dict(folder).keys() == expected.keys()
    model = build_vlm(folder, vision_model_path=tiny_clip_dir)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_chat_with_a_folder_answers_like_its_pth(tmp_path, checkpoint, tiny_clip_dir):
    folder = published_folder(tmp_path / "out" / "minimind-v-v1-small", checkpoint)
    args = ["--vision_model", tiny_clip_dir, "--json", "--temperature", "0", "--max_new_tokens", "8"]
    from_folder = run_cli("--weight", folder, *args)
    from_pth = run_cli("--weight", checkpoint, *args)
    assert from_folder.returncode == 0, from_folder.stderr
    answers = [json.loads(line)["answer"] for line in from_folder.stdout.splitlines()]
    assert len(answers) == 10 and answers == [json.loads(line)["answer"] for line in from_pth.stdout.splitlines()]
    assert folder in find_checkpoints(str(tmp_path / "out"))   # the web demo lists it


def test_training_starts_from_a_folder(tmp_path, checkpoint, tiny_clip_dir):
    data = make_data(tmp_path / "data", n=8)
    folder = published_folder(tmp_path / "v1", checkpoint)
    for name, start in (("folder", folder), ("pth", checkpoint)):
        run_stage("sft", common(data, tiny_clip_dir, tmp_path / name, "--init_weight", start, "--max_steps", "1"))
    a = torch.load(tmp_path / "folder" / "64_vlm_sft.pth", weights_only=True)
    b = torch.load(tmp_path / "pth" / "64_vlm_sft.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_folders_are_one_line_errors(tmp_path, checkpoint):
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="not a MiniMind-V weights folder"):
        read_state_dict(str(other))
    empty = published_folder(tmp_path / "empty", checkpoint)
    os.unlink(os.path.join(empty, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        read_state_dict(empty)
    proc = run_cli("--weight", str(other))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
