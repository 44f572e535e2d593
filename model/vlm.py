"""MiniMind-V: the MiniMind decoder with eyes.

A frozen CLIP turns each image into 50 x 768 features, a linear projector maps them to the
decoder width, and the 50 projected tokens overwrite the `<`x25 `>`x25 placeholder span that
the prompt holds for that image.

Inputs for images (any of them, in the order the placeholders appear, row by row):
- `pixel_values` [N, 3, 224, 224]: encoded by the attached VisionEncoder, all in one call;
- `image_features` [N, 50, 768]: already encoded (the training feature cache).
`images_per_sample` [B] optionally checks that every row got as many images as it has spans.
"""
from typing import Optional

import torch
from torch import nn

from .config import VLMConfig
from .language import MiniMindLM


class VisionProj(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool):
        super().__init__()
        # A one-layer Sequential, so the published key `vision_proj.vision_proj.0.weight` fits.
        self.vision_proj = nn.Sequential(nn.Linear(in_dim, out_dim, bias=bias))

    def forward(self, x):
        return self.vision_proj(x)


class MiniMindVLM(MiniMindLM):
    def __init__(self, config: VLMConfig, vision_encoder: Optional[nn.Module] = None):
        super().__init__(config)
        self.vision_proj = VisionProj(config.vision_hidden_size, config.dim, config.vision_proj_bias)
        self.register_buffer("image_ids", torch.tensor(config.image_ids), persistent=False)
        self.vision_encoder = None
        if vision_encoder is not None:
            self.attach_vision_encoder(vision_encoder)

    # -- the frozen vision tower lives beside the model, not inside its state_dict ---------------
    def attach_vision_encoder(self, encoder: nn.Module) -> "MiniMindVLM":
        if encoder.hidden_size != self.config.vision_hidden_size:
            raise ValueError(f"vision model width {encoder.hidden_size} != config.vision_hidden_size "
                             f"{self.config.vision_hidden_size}")
        # Stored in __dict__ (not as a submodule): CLIP is frozen and not part of our checkpoints,
        # optimizers or DDP buckets. _apply below still moves it with the model.
        self.__dict__["vision_encoder"] = encoder
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.vision_encoder is not None:
            self.vision_encoder._apply(fn, *args, **kwargs)
        return self

    # -- splice ----------------------------------------------------------------------------
    def placeholder_starts(self, input_ids: torch.Tensor):
        """(row, start) of every placeholder span, in reading order, found without Python loops."""
        span = self.image_ids.numel()
        if input_ids.shape[1] < span:
            empty = input_ids.new_zeros(0)
            return empty, empty
        windows = input_ids.unfold(1, span, 1)                      # [B, T-span+1, span]
        hits = (windows == self.image_ids).all(dim=-1)
        # `<`x25 `>`x25 cannot match at two overlapping offsets, so every hit is a distinct span.
        return hits.nonzero(as_tuple=True)

    def _text_positions(self, input_ids):
        rows, starts = self.placeholder_starts(input_ids)
        text = torch.ones_like(input_ids, dtype=torch.bool)
        if rows.numel():
            cols = starts[:, None] + torch.arange(self.image_ids.numel(), device=input_ids.device)
            text[rows[:, None], cols] = False
        return text

    def embed(self, input_ids, pixel_values=None, image_features=None, images_per_sample=None):
        h = self.tok_embeddings(input_ids)
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        if pixel_values is not None:
            if self.vision_encoder is None:
                raise ValueError("pixel_values given but no vision encoder is attached")
            image_features = self.vision_encoder(pixel_values)
        rows, starts = self.placeholder_starts(input_ids)
        n_images = 0 if image_features is None else image_features.shape[0]
        if rows.numel() != n_images:
            raise ValueError(f"the prompt has {rows.numel()} image placeholder(s) but {n_images} "
                             f"image(s) were given")
        if images_per_sample is not None:
            spans_per_row = torch.bincount(rows, minlength=input_ids.shape[0])
            if not torch.equal(spans_per_row.cpu(), images_per_sample.cpu()):
                raise ValueError(f"placeholders per sample {spans_per_row.tolist()} != images per "
                                 f"sample {images_per_sample.tolist()}")
        if n_images == 0:
            return h
        tokens = image_features.to(self.vision_proj.vision_proj[0].weight.dtype)
        projected = self.vision_proj(tokens).to(h.dtype)             # [N, span, dim]
        span = self.image_ids.numel()
        if projected.shape[1] != span:
            raise ValueError(f"image features have {projected.shape[1]} tokens, placeholder has {span}")
        cols = starts[:, None] + torch.arange(span, device=h.device)  # [N, span]
        # Out-of-place so autograd sees text embeddings and projector both.
        return h.index_put((rows[:, None].expand_as(cols), cols), projected)
