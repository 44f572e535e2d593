"""Shared fixtures: tiny random models saved in the real formats, so the real loading code runs.

Nothing here downloads anything; every model is built from a seed and written to a temp folder.
"""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)

from model.checkpoint import atomic_save, model_state_dict  # noqa: E402
from model.config import VLMConfig  # noqa: E402

EVAL = os.path.join(ROOT, "dataset", "eval_images")
CLI = os.path.join(ROOT, "3-eval_chat.py")

TINY_CLIP_HIDDEN = 32


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (demo, benchmarks); `-m 'not slow'` skips them")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(no_gpu)


def save_tiny_clip(path, hidden=TINY_CLIP_HIDDEN, seed=0):
    """A full CLIPModel folder (text tower included, like openai/clip-vit-base-patch32) with a
    224-px, patch-32 vision tower: 50 tokens of width `hidden`."""
    import transformers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=2, image_size=224, patch_size=32),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=100),
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(path)
    return str(path)


def tiny_config(**overrides) -> VLMConfig:
    kwargs = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512,
                  vision_hidden_size=TINY_CLIP_HIDDEN)
    kwargs.update(overrides)
    return VLMConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="session")
def tokenizer():
    from model.prompt import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def tiny_vlm(tiny_clip_dir):
    """A tiny MiniMindVLM with the tiny CLIP attached (eval mode, seeded)."""
    from model.vision import VisionEncoder
    from model.vlm import MiniMindVLM

    torch.manual_seed(0)
    cfg = tiny_config(vision_model_path=tiny_clip_dir)
    return MiniMindVLM(cfg, VisionEncoder.from_pretrained(tiny_clip_dir)).eval()


# ---------------------------------------------------------------- the pinned reference model
def _fill_seeded(module, generator, scale):
    """Overwrite every parameter with seeded normal values of std scale / sqrt(fan_in), in name
    order: the values depend on this seed alone, not on a library's init code."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight") or "layer_norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=generator) * scale / fan_in ** 0.5)


def reference_vlm(tmp_dir):
    """The fixed tiny VLM behind tests/test_reference.py (tiny CLIP saved to tmp_dir)."""
    from model.vision import VisionEncoder
    from model.vlm import MiniMindVLM

    clip_dir = save_tiny_clip(os.path.join(str(tmp_dir), "reference-clip"))
    encoder = VisionEncoder.from_pretrained(clip_dir)
    g = torch.Generator().manual_seed(1234)
    _fill_seeded(encoder.clip, g, 1.0)
    model = MiniMindVLM(tiny_config(vision_model_path=clip_dir), encoder)
    _fill_seeded(model, g, 2.0)
    return model.eval()


def reference_inputs():
    """Prompts (token ids, some with pictures) for the pinned reference."""
    from model.config import IMAGE_PLACEHOLDER_IDS as P

    g = torch.Generator().manual_seed(99)
    pixels = torch.randn(3, 3, 224, 224, generator=g)
    one = [1, 320, 275, 201] + P + [201, 4567, 890, 2345, 2, 201, 1, 1078, 538, 201]
    text = [1, 320, 275, 201, 3456, 789, 1234, 2, 201, 1, 1078, 538, 201]
    two = [1, 320, 275, 201] + P + [201] + P + [201, 777, 2, 201, 1, 1078, 538, 201]
    width = max(map(len, (one, text, two)))
    left = [[0] * (width - len(r)) + r for r in (one, text, two)]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in (one, text, two)]
    labels = [[-100] * (len(one) - 4) + one[-4:], [-100] * (len(text) - 5) + text[-5:] ]
    loss_ids = [one, text + [0] * (len(one) - len(text))]
    labels[1] += [-100] * (len(one) - len(text))
    return {
        "generate": {
            "one_picture": {"input_ids": torch.tensor([one]), "pixel_values": pixels[:1]},
            "text_only": {"input_ids": torch.tensor([text])},
            "two_pictures": {"input_ids": torch.tensor([two]), "pixel_values": pixels[1:3]},
            "penalty": {"input_ids": torch.tensor([one]), "pixel_values": pixels[:1],
                        "repetition_penalty": 1.3},
            "no_cache": {"input_ids": torch.tensor([two]), "pixel_values": pixels[1:3], "use_cache": False},
            "batched_left_padded": {"input_ids": torch.tensor(left), "attention_mask": torch.tensor(mask),
                                    "pixel_values": pixels},
        },
        "loss": {"input_ids": torch.tensor(loss_ids), "labels": torch.tensor(labels),
                 "pixel_values": pixels[:1]},
    }


REFERENCE = os.path.join(ROOT, "tests", "data", "greedy_reference.json")


def pinned_reference():
    """What the reference model must answer to each prompt (24 greedy tokens), and its loss."""
    with open(REFERENCE, encoding="utf-8") as f:
        return json.load(f)


def reference_prompts(device="cpu"):
    """(name, input_ids, generate's other arguments) for each pinned prompt, moved to `device`."""
    for name, case in reference_inputs()["generate"].items():
        case = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
        yield name, case.pop("input_ids"), case


# ---------------------------------------------------------------- checkpoints and the CLI
def save_tiny_checkpoint(path, seed=0):
    """A tiny VLM written as a real `.pth`. n_heads=16 is what loading assumes for `.pth` files;
    the weights are scaled up so that greedy decoding does not repeat a single token."""
    from model.vlm import MiniMindVLM

    torch.manual_seed(seed)
    model = MiniMindVLM(tiny_config(n_heads=16, n_kv_heads=8))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5)
    atomic_save(model_state_dict(model), str(path))
    return str(path)


def published_folder(folder, weights_pth, file_name="pytorch_model.bin"):
    """A folder laid out as the v1 release: the original config.json (its keys, its remote
    code in auto_map, max_seq_len 200) and the weights with the tied embedding stored once."""
    sd = torch.load(weights_pth, weights_only=True)
    sd.pop("output.weight")
    dim = sd["tok_embeddings.weight"].shape[1]
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Transformer"], "auto_map": {"AutoConfig": "LMConfig.LMConfig",
                                                       "AutoModelForCausalLM": "model.Transformer"},
        "dim": dim, "n_layers": n_layers, "n_heads": 16, "n_kv_heads": 8, "vocab_size": 6400, "hidden_dim": None,
        "multiple_of": 64, "norm_eps": 1e-05, "max_seq_len": 200, "dropout": 0.0, "flash_attn": True,
        "image_special_token": "<" * 25 + ">" * 25, "image_ids": [30] * 25 + [32] * 25, "use_moe": False,
        "model_type": "minimind", "torch_dtype": "float32", "transformers_version": "4.44.0"}))
    # The remote code it names must never run: make it fail loudly if it did.
    (folder / "model.py").write_text("raise SystemExit('remote code ran')\n")
    if file_name.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / file_name))
    else:
        torch.save(sd, folder / file_name)
    return str(folder)


def eval_picture(i=0):
    return sorted(os.listdir(EVAL))[i]


_cli = None


def load_cli():
    """3-eval_chat.py as a module (its main(argv) returns the exit code), loaded once."""
    global _cli
    if _cli is None:
        spec = importlib.util.spec_from_file_location("eval_chat", CLI)
        _cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_cli)
    return _cli


def run_cli(*args, stdin=""):
    """A run of 3-eval_chat.py: its main(args) in this process, reading `stdin` and printing
    into strings, returned as a CompletedProcess. In a subprocess each run would spend about
    6 s importing torch and transformers; the tests that need a real process (bytes on stdin,
    the script's own start-up) start one themselves."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(sys, "stdin", io.StringIO(stdin)):
        try:
            code = load_cli().main(list(args))
        except SystemExit as e:   # argparse: a usage error is exit code 2, its message on stderr
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


# ---------------------------------------------------------------- training runs
COLOURS = {"红色": (220, 30, 30), "绿色": (30, 200, 30), "蓝色": (30, 30, 220), "黄色": (230, 220, 20)}


def make_data(folder, n=32, multi=False, name="data.jsonl"):
    """Records asking for the colour of plain pictures (equal lengths: handy for exact checks)."""
    img_dir = folder / "imgs"
    img_dir.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n):
        colour = names[i % len(names)]
        Image.new("RGB", (224, 224), COLOURS[colour]).save(img_dir / f"{i}.png")
        if multi:
            other = names[(i + 1) % len(names)]
            records.append({"id": i, "image": f"{i}.png, {(i + 1) % n}.png", "conversations": [
                {"from": "human", "value": "<image>\n<image>\n两张图片的颜色？"},
                {"from": "gpt", "value": f"{colour}和{other}。"}]})
        else:
            records.append({"id": i, "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\n这是什么颜色？"},
                {"from": "gpt", "value": f"这是{colour}。"}]})
    path = folder / name
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    return str(path), str(img_dir)


def common(data, clip, out, *extra):
    return ["--preset", "tiny", "--data_path", data[0], "--images_path", data[1], "--vision_model", clip,
            "--out_dir", str(out), "--batch_size", "4", "--num_workers", "0", "--log_interval", "1",
            "--no_progress", "--learning_rate", "3e-3", *extra]


def run_stage(stage, argv):
    from trainer.trainer import build_parser, resolve, train

    return train(resolve(build_parser(stage).parse_args(argv), stage))


def history(path):
    with open(str(path) + ".history.json") as f:
        return json.load(f)


def losses(path):
    return [h["loss"] for h in history(path) if "loss" in h]


def damaged_copy(parquet, out, damage):
    """A copy of `parquet` whose column chunks {(row group, column name)} start with bytes no
    Parquet reader can take: a download corrupted in the middle, with a sound footer."""
    import pyarrow.parquet as pq

    data = bytearray(open(parquet, "rb").read())
    metadata = pq.ParquetFile(parquet).metadata
    for group, name in damage:
        chunk = next(metadata.row_group(group).column(c) for c in range(metadata.num_columns)
                     if metadata.row_group(group).column(c).path_in_schema.split(".")[0] == name)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        data[start:start + 64] = b"\xff" * 64
    out.write_bytes(bytes(data))
    return str(out)
