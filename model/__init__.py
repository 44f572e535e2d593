"""MiniMind-V model package: config, decoder, vision tower, VLM, checkpoints, prompts."""
from .config import IMAGE_MARK, IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER_IDS, PRESETS, VLMConfig
from .language import LMOutput, MiniMindLM
from .vlm import MiniMindVLM

__all__ = ["IMAGE_MARK", "IMAGE_PLACEHOLDER", "IMAGE_PLACEHOLDER_IDS", "PRESETS", "VLMConfig",
           "LMOutput", "MiniMindLM", "MiniMindVLM"]
