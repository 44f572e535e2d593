"""transformers entry point of an exported MiniMind-V (`trust_remote_code=True`).

scripts/export_model.py writes this file into the export folder next to unchanged copies of
model/config.py, language.py, vlm.py and vision.py, so an exported model runs exactly our code:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids = model.generate(input_ids, images=[pil_image], max_new_tokens=64)   # prompt + answer

The CLIP vision tower is not part of the export: it is loaded from `config.vision_model_path`
on first use (override with `from_pretrained(..., vision_model_path=...)`).
"""
import os
from typing import List, Optional

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import VLMConfig
from .language import MiniMindLM, MoEGate, RMSNorm, rope_tables
from .vision import VisionEncoder
from .vlm import MiniMindVLM


class MiniMindVForCausalLM(PreTrainedModel):
    config_class = VLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    # Our VLM ties output to tok_embeddings itself; transformers must know it too, so that
    # safetensors stores the matrix once and loading ties it back.
    _tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.model = MiniMindVLM(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        # from_pretrained builds the model on the meta device and fills in only what the file
        # holds: the non-persistent buffers (RoPE tables, placeholder ids) are rebuilt here.
        if isinstance(module, MiniMindVLM):
            cfg = self.config
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)
            module.image_ids.copy_(torch.tensor(cfg.image_ids))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            MiniMindLM._init_weights(module)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, MoEGate):
            nn.init.kaiming_uniform_(module.weight, a=5 ** 0.5)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.model.output

    # -- vision -------------------------------------------------------------------------------
    def load_vision_encoder(self, path: Optional[str] = None) -> VisionEncoder:
        """The CLIP tower, loaded once from `path` or config.vision_model_path (a relative path
        is looked up in the export folder first, then in the working directory)."""
        if self.model.vision_encoder is None or path:
            path = path or self.config.vision_model_path
            local = os.path.join(self.name_or_path or "", path)
            if not os.path.isabs(path) and os.path.isdir(local):
                path = local
            encoder = VisionEncoder.from_pretrained(path, layer=self.config.vision_layer,
                                                    squash=self.config.squash_images)
            self.model.attach_vision_encoder(encoder.to(self.device))
        return self.model.vision_encoder

    def preprocess(self, images: List) -> torch.Tensor:
        """PIL images -> pixel_values, as the model was trained."""
        return self.load_vision_encoder().preprocess(images).to(self.device)

    # -- inference ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, past_key_values=None, use_cache: bool = False,
                logits_to_keep: int = 0, pixel_values: Optional[torch.Tensor] = None,
                image_features: Optional[torch.Tensor] = None, **kwargs) -> CausalLMOutputWithPast:
        """As MiniMindVLM.forward; the cache is our KVCache (model/language.py), extended in place."""
        if pixel_values is not None:
            self.load_vision_encoder()
        out = self.model(input_ids, attention_mask=attention_mask, labels=labels,
                         past_key_values=past_key_values, use_cache=bool(use_cache),
                         logits_to_keep=logits_to_keep, pixel_values=pixel_values,
                         image_features=image_features)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 images: Optional[List] = None, pixel_values: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Our own decoding loop (not transformers' GenerationMixin), with its arguments' usual
        meanings. Greedy unless do_sample. Returns prompt + new tokens, as transformers does."""
        if images is not None:
            pixel_values = self.preprocess(images)
        elif pixel_values is not None:
            self.load_vision_encoder()
        vision = {} if pixel_values is None else {"pixel_values": pixel_values}
        new = self.model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                  temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, **vision)
        return torch.cat([input_ids, new], dim=1)
