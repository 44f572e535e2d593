"""scripts/export_model.py: the exported folder loads with AutoModelForCausalLM (remote code,
offline) and computes exactly what our model computes, pictures included."""
import json
import os
import subprocess
import sys

import pytest
import torch

from model import inference as inf
from model.vision import load_image
from conftest import (EVAL, ROOT, common, eval_picture, make_data, published_folder, run_cli, run_stage,
                      save_tiny_checkpoint)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "64_vlm_sft.pth", seed=1)


@pytest.fixture(scope="module")
def export_dir(checkpoint, tiny_clip_dir, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("export") / "minimind-v-tiny-hf")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export_model.py"),
                             "--weight", checkpoint, "--out_dir", folder, "--vision_model", tiny_clip_dir],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def ours(checkpoint, tiny_clip_dir):
    return inf.load_model(checkpoint, tiny_clip_dir)


@pytest.fixture(scope="module")
def exported(export_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True,
                                                local_files_only=True).eval()


def test_export_folder_contents(export_dir, tiny_clip_dir):
    files = set(os.listdir(export_dir))
    assert {"config.json", "model.safetensors", "modeling_minimind_v.py", "config.py", "language.py",
            "vlm.py", "vision.py", "tokenizer.json", "tokenizer_config.json"} <= files
    with open(os.path.join(export_dir, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "minimind-v"
    assert config["auto_map"] == {"AutoConfig": "config.VLMConfig",
                                  "AutoModelForCausalLM": "modeling_minimind_v.MiniMindVForCausalLM"}
    assert config["vision_model_path"] == os.path.abspath(tiny_clip_dir)
    assert (config["dim"], config["n_layers"], config["n_heads"]) == (64, 2, 16)
    from safetensors import safe_open

    with safe_open(os.path.join(export_dir, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # Tied output layer stored once; every other key is ours under `model.`.
    assert "model.tok_embeddings.weight" in keys and "model.output.weight" not in keys


def test_auto_model_gives_identical_logits(exported, ours, tokenizer):
    assert type(exported).__name__ == "MiniMindVForCausalLM"
    assert exported.model.output.weight.data_ptr() == exported.model.tok_embeddings.weight.data_ptr()
    ids = torch.tensor([inf.build_prompt_ids(tokenizer, "你好，请介绍一下你自己。", 0)])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_auto_model_sees_pictures_like_ours(exported, ours, tokenizer):
    from PIL import Image

    images = [load_image(os.path.join(EVAL, eval_picture(i))) for i in (0, 4)]
    ids = torch.tensor([inf.build_prompt_ids(tokenizer, inf.DEFAULT_QUESTION, 1)])
    pixels = ours.vision_encoder.preprocess(images[:1])
    with torch.no_grad():
        theirs_logits = exported(ids, pixel_values=pixels).logits
        torch.testing.assert_close(theirs_logits, ours(ids, pixel_values=pixels).logits, rtol=0, atol=0)
        # ... and the picture changes the logits (the vision tower is really used).
        assert not torch.allclose(theirs_logits, exported(ids, pixel_values=ours.vision_encoder.preprocess(
            [Image.new("RGB", (64, 64))])).logits)

    full = exported.generate(ids, images=images[:1], max_new_tokens=16, eos_token_id=-1)
    assert torch.equal(full[:, :ids.shape[1]], ids)
    new = ours.generate(ids, max_new_tokens=16, eos_token_id=-1, pixel_values=pixels)
    assert torch.equal(full[:, ids.shape[1]:], new)
    assert len(set(new[0].tolist())) > 3   # not a degenerate repeat of one token


def test_vision_model_path_can_be_overridden(export_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, local_files_only=True,
                                                 vision_model_path=str(tmp_path / "elsewhere"))
    assert model.config.vision_model_path == str(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        model.load_vision_encoder()


def test_tokenizer_loads_from_the_export(export_dir, tokenizer):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    assert theirs.encode("你好 world") == tokenizer.encode("你好 world")


def test_our_loader_and_cli_accept_the_export(export_dir, ours, tokenizer):
    mine = inf.load_model(export_dir)   # vision model recorded in the export
    assert mine.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in mine.state_dict().items())

    picture = os.path.join(EVAL, eval_picture())
    result = run_cli("--weight", export_dir, "--image", picture, "--json", "--temperature", "0",
                     "--max_new_tokens", "8")
    assert result.returncode == 0, result.stderr
    expected = inf.answer(ours, tokenizer, [load_image(picture)], inf.DEFAULT_QUESTION,
                          sampling=inf.Sampling(temperature=0, max_new_tokens=8))
    assert json.loads(result.stdout)["answer"] == expected


def test_export_refuses_missing_weights(tmp_path):
    result = export_command("--weight", str(tmp_path / "absent.pth"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "absent.pth" in result.stderr and not os.path.exists(tmp_path / "out")


def export_command(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export_model.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_published_v1_folder_exports_to_the_same_weights(checkpoint, tiny_clip_dir, tmp_path):
    """It was refused as "already an exported folder"; it is the file users have."""
    v1 = published_folder(tmp_path / "minimind-v-v1-small", checkpoint)
    out = tmp_path / "minimind-v-v1-small-hf"
    result = export_command("--weight", v1, "--out_dir", str(out), "--vision_model", tiny_clip_dir)
    assert result.returncode == 0, result.stderr
    exported = inf.load_model(str(out)).state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in torch.load(checkpoint, weights_only=True).items())
    again = export_command("--weight", str(out), "--out_dir", str(tmp_path / "again"))
    assert again.returncode == 1 and again.stderr == f"error: {out} is already an exported folder\n"


def test_export_output_problems_are_one_line(checkpoint, tiny_clip_dir, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    v1 = published_folder(tmp_path / "v1", checkpoint)
    for out_dir, says in ((a_file, f"--out_dir {a_file} is a file, not a folder"),
                          (a_file / "sub", f"cannot write {a_file / 'sub'}: Not a directory"),
                          (v1, f"--out_dir {v1} is the folder being exported: choose another")):
        weights = v1 if out_dir == v1 else checkpoint
        result = export_command("--weight", weights, "--out_dir", str(out_dir), "--vision_model", tiny_clip_dir)
        assert result.returncode == 1 and result.stderr == f"error: {says}\n", result.stderr
    assert a_file.read_text() == "mine" and sorted(os.listdir(v1)) == ["config.json", "model.py", "pytorch_model.bin"]


def test_training_starts_from_an_export(export_dir, checkpoint, tiny_clip_dir, tmp_path):
    """An exported folder is accepted wherever a .pth is: same weights, and --init_weight."""
    from model.checkpoint import read_state_dict

    from_export, from_pth = read_state_dict(export_dir), read_state_dict(checkpoint)
    assert from_export.keys() == from_pth.keys()
    assert all(torch.equal(from_export[k], from_pth[k]) for k in from_pth)
    out = tmp_path / "out"
    run_stage("sft", common(make_data(tmp_path / "d", n=8), tiny_clip_dir, out,
                            "--init_weight", export_dir, "--max_steps", "1"))
    assert (out / "64_vlm_sft.pth").is_file()
