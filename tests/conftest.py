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
