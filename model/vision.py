"""Pictures in, CLIP features out: the one image loader, the preprocessing, the frozen tower.

- `load_image` opens every picture the project reads (training, feature cache, chat, web, demo).
- `ImagePreprocessor` turns pictures into pixel_values; it needs only the CLIP folder's
  processor config, so a dataset builds it without the model.
- `VisionEncoder` is the frozen CLIP vision model. Its features are the output of one encoder
  layer (the last by default), the hidden states *before* CLIP's post-layernorm: 50 x 768 for
  ViT-B/32 at 224 px (CLS + 7x7 patches), taken with a forward hook so any layer can be chosen
  without changing CLIP's code.
"""
import contextlib
import io
import json
import os
import threading
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .config import is_lfs_pointer

REAL_CLIP_HINT = ("download openai/clip-vit-base-patch32 (config.json, preprocessor_config.json, "
                  "model.safetensors or pytorch_model.bin) into that folder, or run "
                  "`python demo.py` for the small demo encoder")


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
    """PIL's plain convert("RGB"): alpha and palette transparency are dropped (see load_image)."""
    if image.mode == "RGB":
        return image
    with warnings.catch_warnings():
        # PIL warns that palette transparency "should be converted to RGBA": dropping it is the point.
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")


class ImageError(ValueError):
    """A file that is not a readable picture; the message is one line naming it."""


def load_image(source, name: str = None) -> Image.Image:
    """Open a picture fully as RGB: `source` is a path, encoded bytes or a binary file object.

    Alpha is dropped, not composited (PIL's plain convert("RGB"), as MiniMind-V v1 did), so a
    transparent pixel keeps the colour stored under it: the published weights saw pictures that
    way, and training, the feature cache and chat must all see the same pixels.
    `load()` decodes every pixel now, so a truncated file fails here, not inside the model.
    """
    name = name or getattr(source, "name", None) or ("picture bytes" if isinstance(source, bytes) else str(source))
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    elif hasattr(source, "seek"):
        source.seek(0)   # an uploaded file may have been read already
    try:
        with Image.open(source) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise ImageError(f"{name} cannot be read: no such file") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for files that are not pictures
        # The exception's own text often repeats the whole source (an upload's repr): the type says enough.
        raise ImageError(f"{name} is not a readable picture ({type(e).__name__})") from None


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

    @classmethod
    def from_pretrained(cls, path: str, squash: bool = True) -> "ImagePreprocessor":
        """The preprocessing of the CLIP folder at `path`, read without loading the model."""
        check_vision_folder(path, with_weights=False)
        _quiet_transformers()
        processor = clip_processor_class().from_pretrained(path, local_files_only=True)
        return cls(processor, processor_size(processor), squash)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pictures (as load_image gives them) -> pixel_values [N, 3, size, size]."""
        images = [to_rgb(im) for im in images]
        if self.direct is not None:   # squashing, with a processor that only rescales and normalises
            # Picture by picture, each normalised right after its resize, while it is still in
            # the CPU's cache: for a batch of 74 pictures a sixth less time than each stage over
            # the whole batch (docs/batched_eval.md).
            out = torch.empty(len(images), 3, self.size, self.size)
            for picture, image in zip(out, images):
                self._normalise(image.resize((self.size, self.size), Image.BICUBIC), picture, *self.direct)
            return out
        if self.squash:
            images = [im.resize((self.size, self.size), Image.BICUBIC) for im in images]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @staticmethod
    def _normalise(image, out, scale, mean, std):
        """Write the picture's pixel values into `out` [3, size, size]: the same arithmetic as
        (pixels.float() * scale - mean) / std, bit for bit, in place: about twice as fast,
        without three picture-sized temporaries."""
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return out.copy_(pixels).mul_(scale).sub_(mean).div_(std)

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
            mean = torch.tensor(p.image_mean if p.do_normalize else [0.0] * 3).view(3, 1, 1)
            std = torch.tensor(p.image_std if p.do_normalize else [1.0] * 3).view(3, 1, 1)
        except (AttributeError, TypeError):
            return None
        rng = np.random.default_rng(0)
        probe = Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))
        try:
            expected = p(images=[probe], return_tensors="pt")["pixel_values"]
        except Exception:   # noqa: BLE001 - a processor we cannot probe keeps the slow path
            return None
        got = self._normalise(probe, torch.empty(3, self.size, self.size), scale, mean, std)[None]
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-5):
            return None
        return scale, mean, std


CLIP_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_vision_folder(path: str, with_weights: bool = True):
    """One line naming what is wrong with the CLIP folder at `path` (missing, incomplete, a Git
    LFS pointer instead of the weights, another kind of model), before transformers' own errors.
    `with_weights=False`: only the preprocessing is wanted, which needs the configs alone."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"vision model not found at {path}: {REAL_CLIP_HINT}")
    weights = [os.path.join(path, n) for n in CLIP_WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
    missing = [] if os.path.isfile(os.path.join(path, "preprocessor_config.json")) else ["preprocessor_config.json"]
    missing += [] if weights or not with_weights else [" or ".join(CLIP_WEIGHT_FILES)]
    if missing:
        raise FileNotFoundError(f"the vision model at {path} is incomplete ({' and '.join(missing)} missing): "
                                f"{REAL_CLIP_HINT}")
    if weights and is_lfs_pointer(weights[0]):
        raise FileNotFoundError(f"{weights[0]} is a Git LFS pointer, not the weights: run `git lfs pull` "
                                f"in {path}, or download the file itself")
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (ValueError, AttributeError):
        raise ValueError(f"{path}/config.json is not a JSON object: {REAL_CLIP_HINT}") from None
    if model_type not in ("clip", "clip_vision_model"):
        raise ValueError(f"{path} holds a {model_type!r} model, not CLIP: point --vision_model at the CLIP "
                         f"ViT-B/32 folder")


def processor_size(processor) -> int:
    """The square side the processor's pictures come out at (asked of the processor itself: its
    size settings are spelled differently from one transformers version to the next)."""
    probe = Image.new("RGB", (32, 32))
    return int(processor(images=[probe], return_tensors="pt")["pixel_values"].shape[-1])


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
        self.hooked_layer = tower.encoder.layers[layer]
        # A hook sees every forward through its layer, whichever thread runs it, so calls from
        # several threads (web sessions) take turns.
        self._one_call_at_a_time = threading.Lock()

    @property
    def hidden_size(self) -> int:
        return self.clip.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.clip.config.image_size

    @classmethod
    def from_pretrained(cls, path: str, layer: int = -1, squash: bool = True) -> "VisionEncoder":
        """Load from a local folder only: there is never a hub download at run time."""
        check_vision_folder(path)
        from transformers import CLIPVisionModel

        _quiet_transformers()
        model = CLIPVisionModel.from_pretrained(path, local_files_only=True)
        processor = clip_processor_class().from_pretrained(path, local_files_only=True)
        return cls(model, processor, layer=layer, squash=squash)

    def train(self, mode: bool = True):
        # Frozen means frozen: the tower stays in eval mode whatever the trainer says.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> features [N, tokens, hidden], all images in one call."""
        pixel_values = pixel_values.to(self.clip.device, self.clip.dtype, non_blocking=True)
        on_cuda = pixel_values.device.type == "cuda"
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        captured = []

        def keep_output(module, inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        with self._one_call_at_a_time:
            handle = self.hooked_layer.register_forward_hook(keep_output)
            try:
                with amp:
                    self.clip(pixel_values=pixel_values)
            finally:
                handle.remove()
        return captured[0]
