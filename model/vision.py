"""The frozen vision tower: a transformers CLIP vision model read from a local folder.

Features are the output of one encoder layer (the last by default), i.e. the hidden states
*before* CLIP's post-layernorm: 50 x 768 for ViT-B/32 at 224 px (CLS + 7x7 patches). They are
captured with a forward hook, so any layer can be chosen without changing CLIP's code.
"""
import contextlib
import os
import threading
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

REAL_CLIP_HINT = ("download openai/clip-vit-base-patch32 (config.json, preprocessor_config.json, "
                  "model.safetensors or pytorch_model.bin) into that folder, or run "
                  "`python dataset/demo_data.py` for the small demo encoder")


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def clip_processor_class():
    """The CLIP image processor to use: in transformers 5 the PIL one (the default "fast" one
    needs torchvision), in transformers 4 the only one."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor


def to_rgb(image: Image.Image) -> Image.Image:
    """CLIP wants 3-channel RGB; palette, grey, CMYK and alpha images are converted (alpha is
    composited on white so transparent areas do not turn black)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


class ImagePreprocessor:
    """PIL images -> pixel_values [N, 3, 224, 224]. Small and picklable, so DataLoader workers
    can run it without carrying the CLIP weights along.

    By default every image is first squashed to a square (aspect ratio not kept), as
    MiniMind-V v1 did and its published weights were trained with; squash=False keeps the
    processor's own resize + centre crop.
    """

    def __init__(self, processor, size: int, squash: bool = True):
        self.processor, self.size, self.squash = processor, size, squash
        self.direct = self._direct_normalisation() if squash else None

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        images = [to_rgb(im) for im in images]
        if self.squash:
            images = [im.resize((self.size, self.size), Image.BICUBIC) for im in images]
            if self.direct is not None:
                return self._normalise(images, *self.direct)
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @staticmethod
    def _normalise(images, scale, mean, std):
        pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
        return (pixels.float() * scale - mean) / std

    def _direct_normalisation(self):
        """(scale, mean, std) when the processor, given a picture that already has the target
        size, does nothing but rescale and normalise it; else None. Doing that arithmetic here
        halves the preprocessing time per picture (which matters when caching the features of a
        big dataset).
        Verified once against the processor itself, so an unusual processor config just keeps
        the slow path."""
        p = self.processor
        try:
            scale = float(p.rescale_factor) if p.do_rescale else 1.0
            mean = torch.tensor(p.image_mean if p.do_normalize else [0.0] * 3).view(1, 3, 1, 1)
            std = torch.tensor(p.image_std if p.do_normalize else [1.0] * 3).view(1, 3, 1, 1)
        except (AttributeError, TypeError):
            return None
        rng = np.random.default_rng(0)
        probe = Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))
        try:
            expected = p(images=[probe], return_tensors="pt")["pixel_values"]
        except Exception:   # noqa: BLE001 - a processor we cannot probe keeps the slow path
            return None
        got = self._normalise([probe], scale, mean, std)
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-5):
            return None
        return scale, mean, std


class VisionEncoder(nn.Module):
    """CLIP vision model + image processor, frozen, returning hooked layer features [N, 50, 768]."""

    def __init__(self, clip_vision_model: nn.Module, processor, layer: int = -1, squash: bool = True):
        super().__init__()
        self.clip = clip_vision_model
        self.preprocess = ImagePreprocessor(processor, clip_vision_model.config.image_size, squash)
        self.clip.requires_grad_(False)
        self.clip.eval()
        # transformers 4.x nests the tower under `.vision_model`; 5.x does not.
        tower = getattr(self.clip, "vision_model", self.clip)
        self.layer_index = layer
        # Thread-local: the hook hands the features to the forward call of the same thread,
        # so a web server may encode for several sessions at once.
        self._local = threading.local()
        tower.encoder.layers[layer].register_forward_hook(self._capture)

    @property
    def hidden_size(self) -> int:
        return self.clip.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.clip.config.image_size

    @classmethod
    def from_pretrained(cls, path: str, layer: int = -1, squash: bool = True) -> "VisionEncoder":
        """Load from a local folder only: there is never a hub download at run time."""
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"vision model not found at {path}: {REAL_CLIP_HINT}")
        from transformers import CLIPVisionModel

        _quiet_transformers()
        model = CLIPVisionModel.from_pretrained(path, local_files_only=True)
        processor = clip_processor_class().from_pretrained(path, local_files_only=True)
        return cls(model, processor, layer=layer, squash=squash)

    def train(self, mode: bool = True):
        # Frozen means frozen: the tower stays in eval mode whatever the trainer says.
        return super().train(False)

    def _capture(self, module, inputs, output):
        self._local.features = output[0] if isinstance(output, tuple) else output

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> features [N, tokens, hidden], all images in one call."""
        pixel_values = pixel_values.to(self.clip.device, self.clip.dtype, non_blocking=True)
        on_cuda = pixel_values.device.type == "cuda"
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        with amp:
            self.clip(pixel_values=pixel_values)
        features, self._local.features = self._local.features, None
        return features

    def encode_images(self, images: List[Image.Image]) -> torch.Tensor:
        return self(self.preprocess(images))
