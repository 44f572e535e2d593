"""MiniMind-V: the MiniMind decoder with eyes.

One picture's way to the loss, top to bottom in `MiniMindVLM.forward`:
  prompt ids --tok_embeddings--> [B, T, dim]           the `<`x25 `>`x25 span marks each picture
  pixel_values [N, 3, 224, 224] --frozen CLIP--> [N, 50, 768]   (features of its last layer)
  --vision_proj--> [N, 50, dim] --splice--> overwrite the N placeholder spans, in reading order
  --decoder--> logits, and with labels the token cross entropy.
`image_features` [N, 50, 768] may be given instead of pixel_values (the training feature cache).
"""
from typing import Optional

import torch
from torch import nn

from .config import VLMConfig
from .language import LMOutput, MiniMindLM


class VisionProj(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool):
        super().__init__()
        # A one-layer Sequential, so the published key `vision_proj.vision_proj.0.weight` fits.
        self.vision_proj = nn.Sequential(nn.Linear(in_dim, out_dim, bias=bias))

    def forward(self, x):
        return self.vision_proj(x)


class MiniMindVLM(MiniMindLM):
    """The decoder (inherited, so the published keys stay top-level) plus the projector; the
    frozen CLIP tower is attached beside it, outside the state_dict."""

    def __init__(self, config: VLMConfig, vision_encoder: Optional[nn.Module] = None):
        super().__init__(config)
        self.vision_proj = VisionProj(config.vision_hidden_size, config.dim, config.vision_proj_bias)
        self.register_buffer("image_ids", torch.tensor(config.image_ids), persistent=False)
        self.vision_encoder = None
        if vision_encoder is not None:
            self.attach_vision_encoder(vision_encoder)

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

    # -- the forward, top to bottom -----------------------------------------------------------
    def forward(self, input_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                image_features: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                **decoder_args) -> LMOutput:
        """`decoder_args` are MiniMindLM.forward's: labels, attention_mask, past_key_values, ..."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_features)
        return super().forward(inputs_embeds=inputs_embeds, **decoder_args)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                     image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Prompt ids [B, T] and its pictures -> the decoder's input embeddings [B, T, dim]."""
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        h = self.tok_embeddings(input_ids)                              # 1. the prompt's tokens
        if pixel_values is not None:
            if self.vision_encoder is None:
                raise ValueError("pixel_values given but no vision encoder is attached")
            image_features = self.vision_encoder(pixel_values)          # 2. frozen CLIP [N, 50, 768]
        rows, starts = self.placeholder_starts(input_ids)
        n_images = 0 if image_features is None else image_features.shape[0]
        if rows.numel() != n_images:
            raise ValueError(f"the prompt has {rows.numel()} image placeholder(s) but {n_images} "
                             f"image(s) were given")
        if n_images == 0:
            if not (self.training and torch.is_grad_enabled()):
                return h
            # Training on text alone: the projector still runs, on no pictures, so that it has a
            # gradient (zero) like every other parameter, as DDP without find_unused_parameters
            # needs.
            image_features = h.new_zeros(0, self.image_ids.numel(), self.config.vision_hidden_size)
        weight = self.vision_proj.vision_proj[0].weight
        image_tokens = self.vision_proj(image_features.to(weight.dtype)).to(h.dtype)   # 3. [N, 50, dim]
        return self.splice(h, rows, starts, image_tokens)              # 4. into the spans

    # -- where the pictures go ----------------------------------------------------------------
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

    def span_columns(self, starts: torch.Tensor) -> torch.Tensor:
        return starts[:, None] + torch.arange(self.image_ids.numel(), device=starts.device)   # [N, span]

    def splice(self, h, rows, starts, image_tokens):
        if image_tokens.shape[1] != self.image_ids.numel():
            raise ValueError(f"image features have {image_tokens.shape[1]} tokens, placeholder has "
                             f"{self.image_ids.numel()}")
        cols = self.span_columns(starts)
        # Out-of-place so autograd sees text embeddings and projector both.
        return h.index_put((rows[:, None].expand_as(cols), cols), image_tokens)

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: True where a picture token sits (inside a placeholder span)."""
        rows, starts = self.placeholder_starts(input_ids)
        positions = torch.zeros_like(input_ids, dtype=torch.bool)
        if rows.numel():
            cols = self.span_columns(starts)
            positions[rows[:, None].expand_as(cols), cols] = True
        return positions

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                 image_features: Optional[torch.Tensor] = None, **generate_args):
        """MiniMindLM.generate with pictures: they are encoded and spliced in once, for the prompt."""
        embeds = self.embed_inputs(input_ids, pixel_values, image_features)
        return super().generate(input_ids, inputs_embeds=embeds, image_positions=self.image_positions(input_ids),
                                **generate_args)
