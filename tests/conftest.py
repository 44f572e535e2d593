"""Shared fixtures: tiny random models saved in the real formats, so the real loading code runs.

Nothing here downloads anything; every model is built from a seed and written to a temp folder.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)

from model.config import VLMConfig  # noqa: E402

TINY_CLIP_HIDDEN = 32


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
