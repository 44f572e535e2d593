"""Configuration of a MiniMind-V model: the decoder, the MoE options and the vision settings.

Sizes are chosen with named presets (see PRESETS), never by editing defaults in source.
Also `number_in` and `device_name`, the argparse types every command line uses for its numeric
settings and its --device.
"""
import argparse
import math
import os

import torch
from transformers import PretrainedConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the real CLIP ViT-B/32 folder goes, and where the offline demo writes its small encoder.
DEFAULT_VISION_MODEL = os.path.join(REPO_ROOT, "model", "vision_model", "clip-vit-base-patch32")
DEMO_VISION_MODEL = os.path.join(REPO_ROOT, "model", "vision_model", "demo-clip")
# Where v1's README had users put it (the whole CLIP, text tower included: it loads the same).
V1_VISION_MODEL = os.path.join(REPO_ROOT, "model", "clip_model", "clip-vit-base-patch32")
# How a weights file cloned from the Hub without git-lfs begins: a pointer, not the weights.
LFS_POINTER = b"version https://git-lfs"


def default_vision_model() -> str:
    """The CLIP folder used when none is named: ours, else v1's where only that one is there."""
    there = [p for p in (DEFAULT_VISION_MODEL, V1_VISION_MODEL) if os.path.isfile(os.path.join(p, "config.json"))]
    return there[0] if there else DEFAULT_VISION_MODEL


def is_lfs_pointer(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(LFS_POINTER)) == LFS_POINTER

# `<` * 25 + `>` * 25: the span in the prompt that the 50 visual tokens overwrite.
# In the MiniMind tokenizer `<` is id 30 and `>` is id 32 (tests check this).
IMAGE_PLACEHOLDER = "<" * 25 + ">" * 25
IMAGE_PLACEHOLDER_IDS = [30] * 25 + [32] * 25
# What users and datasets write in a prompt to say "a picture goes here".
IMAGE_MARK = "<image>"
# Label of a position without a target: the loss skips it (the HF / torch convention).
IGNORE_INDEX = -100

# The two published sizes, plus small ones for the offline demo and smoke tests. MoE is an
# orthogonal switch. Weight files hold no config and the head split cannot be read off the
# weight shapes: loaders take it from the preset of the same dim and depth (`heads_for`).
PRESETS = {
    "512": dict(dim=512, n_layers=8),     # ~27M parameters, the flagship (16 / 8 heads)
    "768": dict(dim=768, n_layers=16),    # ~109M parameters
    # Trains in minutes on a CPU. 4 heads of 32 dims rather than MiniMind's 16: split 16 ways,
    # a 128-wide model would attend with 8-dim queries.
    "demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512),
    "tiny": dict(dim=64, n_layers=2, max_seq_len=512),   # smoke tests
}


def number_in(kind, low, high=None, low_open=False):
    """An argparse type: a `kind` number in [low, high] ((low, high] with low_open). A value out
    of range stops at parsing with one line naming the flag, not hours later in a traceback."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low or (low_open and value == low) or (high is not None and value > high) or value != value:
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return value
    return parse


def device_name(text: str) -> str:
    """An argparse type for --device: a device this machine can run on ("cpu", "cuda", "cuda:1",
    "mps"), checked at parsing rather than in a traceback at the first tensor moved there."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise argparse.ArgumentTypeError(f"{text!r}: {build}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: Apple's MPS is not available here")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu, cuda and mps devices are supported")
    return text


def size_tag(dim: int, use_moe: bool = False) -> str:
    """The prefix of output file names, as in the original: `512`, `768_moe`, ..."""
    return f"{dim}{'_moe' if use_moe else ''}"


def heads_for(dim: int, n_layers: int):
    """(n_heads, n_kv_heads) of the preset with this width and depth; MiniMind's 16 / 8 for any
    other size (as in every published checkpoint)."""
    for preset in PRESETS.values():
        if (preset["dim"], preset["n_layers"]) == (dim, n_layers):
            return preset.get("n_heads", 16), preset.get("n_kv_heads", 8)
    return 16, 8


class VLMConfig(PretrainedConfig):
    model_type = "minimind-v"

    def __init__(
        self,
        dim: int = 512,
        n_layers: int = 8,
        n_heads: int = 16,
        n_kv_heads: int = 8,
        vocab_size: int = 6400,
        hidden_dim: int = None,
        multiple_of: int = 64,
        norm_eps: float = 1e-5,
        max_seq_len: int = 8192,
        rope_theta: float = 1e4,
        dropout: float = 0.0,
        # Mixture of experts (the MiniMind-MoE variant)
        use_moe: bool = False,
        n_routed_experts: int = 4,
        num_experts_per_tok: int = 2,
        n_shared_experts: int = 1,
        norm_topk_prob: bool = True,
        aux_loss_alpha: float = 0.01,
        seq_aux: bool = True,
        # Vision
        vision_model_path: str = DEFAULT_VISION_MODEL,
        vision_hidden_size: int = 768,
        vision_layer: int = -1,
        image_token_len: int = 50,
        image_ids=None,
        vision_proj_bias: bool = False,
        squash_images: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        **kwargs,
    ):
        self.dim = dim
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.vocab_size = vocab_size
        # SwiGLU keeps the parameter count of a 4*dim MLP: 2/3 of it, rounded up to multiple_of.
        if hidden_dim is None:
            hidden_dim = multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)
        self.hidden_dim = hidden_dim
        self.multiple_of = multiple_of
        self.norm_eps = norm_eps
        self.max_seq_len = max_seq_len
        self.rope_theta = rope_theta
        self.dropout = dropout
        self.use_moe = use_moe
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.norm_topk_prob = norm_topk_prob
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.vision_model_path = vision_model_path
        self.vision_hidden_size = vision_hidden_size
        self.vision_layer = vision_layer
        self.image_token_len = image_token_len
        self.image_ids = list(image_ids) if image_ids is not None else list(IMAGE_PLACEHOLDER_IDS)
        self.vision_proj_bias = vision_proj_bias
        self.squash_images = squash_images
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        if len(self.image_ids) != image_token_len:
            raise ValueError(f"image_ids has {len(self.image_ids)} ids but image_token_len={image_token_len}")
        # The output layer is always tied to the embeddings; a saved config.json repeats the flag.
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, tie_word_embeddings=True, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def tag(self) -> str:
        return size_tag(self.dim, self.use_moe)

    @classmethod
    def from_preset(cls, name: str, use_moe: bool = False, **overrides) -> "VLMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "use_moe": use_moe, **overrides})
