"""Reading and writing MiniMind-V weight files (`*_llm.pth`, `*_vlm_pretrain.pth`, `*_vlm_sft.pth`).

Loading is strict: a missing or unexpected key is an error that lists the keys, because a
silent `strict=False` is how a wrong file turns into a model that speaks nonsense. Only the
known harmless differences of old files are normalised away (see `normalize_state_dict`).
"""
import errno
import glob
import io
import logging
import os
import re
import tempfile
from typing import Dict, List, Optional

import torch

from .config import VLMConfig, heads_for
from .vlm import MiniMindVLM, VisionProj

log = logging.getLogger("minimind_v")

PROJ_PREFIX = "vision_proj."


class CheckpointError(ValueError):
    pass


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.tmp-"


def atomic_save(obj, path: str) -> None:
    """Write `obj` to a temp file next to `path`, then rename it over `path`: a killed run or a
    full disk never leaves a half-written checkpoint under the real name, and the previous one
    stays intact until the new one is complete.

    The object is serialised in memory first and written with plain file writes, so a full
    disk is reported as what it is (torch.save straight to a file reports "unexpected pos").
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            previous = (f"the previous {path} is intact" if os.path.exists(path) else f"no earlier {path} existed")
            raise CheckpointError(f"no space left on the device of {folder} while saving {path} "
                                  f"({len(buffer.getbuffer()) / 1e6:.0f} MB); {previous}") from None
        raise


def remove_stale_temp_files(path: str) -> List[str]:
    """Delete the temp files that a run killed while saving `path` left behind (only ours: they
    are named after `path`). Returns what was removed."""
    folder = os.path.dirname(os.path.abspath(path))
    stale = glob.glob(os.path.join(glob.escape(folder), glob.escape(_temp_prefix(path)) + "*"))
    for tmp in stale:
        os.unlink(tmp)
        log.info("removed %s, left by a run stopped while saving", tmp)
    return stale


# The exported transformers model keeps our VLM as its `.model` attribute (modeling_minimind_v.py).
EXPORT_PREFIX = "model."


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Our state_dict from a `.pth` file (weights or a training resume file) or from a folder
    written by scripts/export_model.py."""
    if os.path.isdir(path):
        return _read_export_weights(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]   # a training resume file
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    return normalize_state_dict(obj)


def _read_export_weights(folder: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} not found: not an exported model folder, or an incomplete export")
    try:
        sd = load_file(weights)
    except Exception as e:
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    return normalize_state_dict({k[len(EXPORT_PREFIX):] if k.startswith(EXPORT_PREFIX) else k: v
                                 for k, v in sd.items()})


def normalize_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Undo what wrappers and old versions added: `_orig_mod.` (torch.compile) and `module.`
    (DDP) prefixes, the causal `attention.mask` buffers old files saved, and any vision-tower
    weights (CLIP is loaded from its own folder)."""
    out = {}
    for key, value in sd.items():
        key = re.sub(r"(^|\.)(_orig_mod|module)\.", r"\1", key)
        if key.endswith("attention.mask") or key.startswith("vision_encoder."):
            continue
        out[key] = value
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]   # tied; some writers keep one copy
    return out


REQUIRED_KEYS = ("tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
                 "norm.weight")


def check_minimind_keys(sd: Dict[str, torch.Tensor], name: str):
    """One line instead of a KeyError when a file holds another model's weights (or none)."""
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if not missing and any(re.match(r"layers\.0\.feed_forward\.(w1|experts\.0\.w1)\.weight$", k) for k in sd):
        return
    found = ", ".join(sorted(sd)[:5]) + (f" ... ({len(sd)} keys)" if len(sd) > 5 else "") if sd else "no keys at all"
    raise CheckpointError(f"not a MiniMind-V checkpoint: {name} lacks {', '.join(missing) or 'the feed-forward weights'}"
                          f" (it holds {found})")


def config_from_state_dict(sd: Dict[str, torch.Tensor], name: str = "state_dict", **overrides) -> VLMConfig:
    """Infer the size of the model that wrote `sd` (dim, layers, heads of the kv projections,
    MoE, projector bias), so inference needs no size flags. The number of query heads is not in
    the shapes: it comes from the preset of the same size (16 for unknown sizes, see heads_for)."""
    check_minimind_keys(sd, name)
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    n_heads = overrides.pop("n_heads", heads_for(dim, n_layers)[0])
    kv_dim = sd["layers.0.attention.wk.weight"].shape[0]
    experts = {int(m.group(1)) for k in sd for m in [re.match(r"layers\.0\.feed_forward\.experts\.(\d+)\.", k)] if m}
    w1 = sd["layers.0.feed_forward.experts.0.w1.weight" if experts else "layers.0.feed_forward.w1.weight"]
    kwargs = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=kv_dim // (dim // n_heads),
                  vocab_size=vocab, hidden_dim=w1.shape[0], use_moe=bool(experts),
                  vision_proj_bias=PROJ_PREFIX + "vision_proj.0.bias" in sd)
    if experts:
        kwargs.update(n_routed_experts=len(experts),
                      n_shared_experts=int(any(".shared_experts." in k for k in sd)))
    if PROJ_PREFIX + "vision_proj.0.weight" in sd:
        kwargs["vision_hidden_size"] = sd[PROJ_PREFIX + "vision_proj.0.weight"].shape[1]
    kwargs.update(overrides)
    return VLMConfig(**kwargs)


def load_weights(model: MiniMindVLM, source, name: Optional[str] = None) -> str:
    """Load a weight file (path) or state_dict into `model`, strictly. Returns what was loaded.

    - An LLM-only file (no projector keys) loads the decoder; the projector keeps its fresh
      initialisation and one log line says so.
    - A file whose projector has a bias switches the model's projector to a biased one.
    """
    sd = read_state_dict(source) if isinstance(source, str) else normalize_state_dict(source)
    name = name or (source if isinstance(source, str) else "state_dict")
    has_proj = any(k.startswith(PROJ_PREFIX) for k in sd)
    if has_proj:
        file_bias = PROJ_PREFIX + "vision_proj.0.bias" in sd
        if file_bias != model.config.vision_proj_bias:
            model.config.vision_proj_bias = file_bias
            old = model.vision_proj.vision_proj[0].weight
            model.vision_proj = VisionProj(model.config.vision_hidden_size, model.config.dim,
                                           file_bias).to(old.device, old.dtype)
    expected = model.state_dict()
    if not has_proj:
        expected = {k: v for k, v in expected.items() if not k.startswith(PROJ_PREFIX)}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong_shape = sorted(f"{k} {tuple(sd[k].shape)} (model wants {tuple(expected[k].shape)})"
                         for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        problems = [f"missing keys: {show(missing)}" if missing else "",
                    f"unexpected keys: {show(unexpected)}" if unexpected else "",
                    f"wrong shapes: {show(wrong_shape)}" if wrong_shape else ""]
        raise CheckpointError(f"{name} does not fit a {model.config.tag} model "
                              f"(dim={model.config.dim}, n_layers={model.config.n_layers}): "
                              + "; ".join(p for p in problems if p))
    model.load_state_dict(sd, strict=has_proj)
    if not has_proj:
        log.info("%s holds no projector (an LLM-only file): vision_proj starts freshly initialised", name)
        return "llm"
    return "vlm"


def model_state_dict(model) -> Dict[str, torch.Tensor]:
    """The weights to publish: unwrapped from DDP/compile, on CPU, keys as in the originals."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def build_vlm(weights: Optional[str] = None, config: Optional[VLMConfig] = None,
              vision_model_path: Optional[str] = None, device="cpu", **config_overrides) -> MiniMindVLM:
    """A ready-to-use VLM: config (given, or inferred from the weights), weights, vision tower."""
    from .vision import VisionEncoder

    sd = read_state_dict(weights) if weights else None
    if config is None:
        config = (config_from_state_dict(sd, weights, **config_overrides) if sd is not None
                  else VLMConfig(**config_overrides))
    if vision_model_path:
        config.vision_model_path = vision_model_path
    encoder = VisionEncoder.from_pretrained(config.vision_model_path, layer=config.vision_layer,
                                            squash=config.squash_images)
    config.vision_hidden_size = encoder.hidden_size
    model = MiniMindVLM(config, encoder)
    if sd is not None:
        load_weights(model, sd, name=weights)
    return model.to(device)
