"""MiniMind-V model package: config, decoder, vision tower, VLM, checkpoints, prompts."""


def _check_versions():
    """Stop at import, in one line, on a Python, torch or transformers too old for this code,
    instead of a TypeError deep inside the first forward pass. The floors (keep requirements.txt
    in step):
    - Python 3.10: dataclass(kw_only=True) (trainer/trainer.py);
    - torch 2.5: F.scaled_dot_product_attention(enable_gqa=...) (model/language.py); it also
      covers F.rms_norm (2.4) and torch.amp.GradScaler("cuda") (2.3);
    - transformers 4.34: tokenizer.apply_chat_template (model/prompt.py); CLIPImageProcessor
      (4.26) is older. The whole test suite passes with 4.34.1 (and 4.40.2, 4.46.0)."""
    import re
    import sys

    if sys.version_info[:2] < (3, 10):
        raise SystemExit(f"MiniMind-V needs Python >= 3.10 (found {sys.version_info[0]}.{sys.version_info[1]})")
    import torch
    import transformers

    def release(version: str):
        """(major, minor) of a version string: "2.6.0a0+ecf3bae" (NVIDIA's builds) -> (2, 6)."""
        found = re.match(r"(\d+)\.(\d+)", version)
        return (int(found[1]), int(found[2])) if found else (0, 0)

    for name, module, floor in (("torch", torch, (2, 5)), ("transformers", transformers, (4, 34))):
        found = str(getattr(module, "__version__", "0"))
        if release(found) < floor:
            wanted = ".".join(map(str, floor))
            raise SystemExit(f"MiniMind-V needs {name} >= {wanted} (found {found}): "
                             f"pip install -U '{name}>={wanted}' (see requirements.txt)")


_check_versions()
del _check_versions

from .config import IMAGE_MARK, IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER_IDS, PRESETS, VLMConfig  # noqa: E402
from .language import LMOutput, MiniMindLM  # noqa: E402
from .vlm import MiniMindVLM  # noqa: E402

__all__ = ["IMAGE_MARK", "IMAGE_PLACEHOLDER", "IMAGE_PLACEHOLDER_IDS", "PRESETS", "VLMConfig",
           "LMOutput", "MiniMindLM", "MiniMindVLM"]
