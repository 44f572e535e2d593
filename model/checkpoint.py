"""Reading and writing MiniMind-V weight files (`*_llm.pth`, `*_vlm_pretrain.pth`, `*_vlm_sft.pth`).

Loading is strict: a missing or unexpected key is an error that lists the keys, because a
silent `strict=False` is how a wrong file turns into a model that speaks nonsense. Only the
known harmless differences of old files are normalised away (see `normalize_state_dict`).
"""
import contextlib
import errno
import glob
import io
import json
import logging
import os
import pickle
import re
import uuid
from typing import Dict, List, Optional

import torch

from .config import VLMConfig, heads_for, is_lfs_pointer
from .vlm import MiniMindVLM, VisionProj

log = logging.getLogger("minimind_v")

PROJ_PREFIX = "vision_proj."


class CheckpointError(ValueError):
    pass


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.tmp-"


def _temp_path(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, f"{_temp_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_output(path: str, sync: bool = True):
    """Yield a temporary path next to `path` to write to. Once the block has finished, the file is
    flushed to disk and renamed over `path`, so a killed run or a full disk never leaves a
    half-written file under the real name, and the previous one stays intact until the new one is
    complete; if the block fails, the temporary file is removed. Every file a run or a conversion
    writes for the user (weights, resume state, feature cache index, converted data) goes through
    here. `sync=False` skips the flush, for many small files that a rerun rewrites (a
    conversion's pictures): a flush each would cost more than the writing.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Created by the writer, not by mkstemp: the file gets the usual permissions (mkstemp's 0600
    # made the weights unreadable to the rest of a shared box).
    tmp = _temp_path(path)
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_save(obj, path: str) -> None:
    """torch.save through `atomic_output`. The object is serialised in memory first and written
    with plain file writes, so a full disk is reported as what it is (torch.save straight to a
    file reports "unexpected pos")."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = os.path.dirname(os.path.abspath(path))
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


def check_not_lfs_pointer(path: str, what: str = "checkpoint"):
    if is_lfs_pointer(path):
        raise CheckpointError(f"cannot read {what} {path}: a Git LFS pointer, not the weights "
                              f"(run `git lfs pull`, or download the file itself)")


def load_torch_file(path: str, what: str = "checkpoint"):
    """torch.load(path, weights_only=True): tensors and plain values only, so the file cannot
    run code when read. What can go wrong is said in one CheckpointError (torch's own messages
    run to several lines, and for a file it refuses suggest turning that protection off)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"cannot read {what} {path}: the file is empty")
    check_not_lfs_pointer(path, what)
    if not head.startswith(b"PK\x03\x04") and head[:1] != b"\x80":   # torch.save's zip, or an old-style pickle
        raise CheckpointError(f"cannot read {what} {path}: not a file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain values, "
                              f"which could run code") from None
    except Exception as e:   # a truncated or damaged file
        reason = str(e).split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {what} {path}: truncated or corrupt ({reason})") from None


# The exported transformers model keeps our VLM as its `.model` attribute (modeling_minimind_v.py).
EXPORT_PREFIX = "model."


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Our state_dict from a `.pth` file (weights or a training resume file) or a weights folder
    (see `is_weights_folder`). Read as tensors only: a file cannot run code when loaded."""
    if os.path.isdir(path):
        return _read_folder_weights(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = load_torch_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]   # a training resume file
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    return normalize_state_dict(obj)


# --------------------------------------------------------------------------- weights folders
# Two kinds hold MiniMind-V weights in the Hugging Face layout, and neither's code is ever run:
# - the published v1 folders (minimind-v-v1, minimind-v-v1-small): config.json of the original
#   (`dim`, `n_layers`, `n_heads`, ..., `auto_map` to its remote code) and pytorch_model.bin (or,
#   on some mirrors, model.safetensors) holding our published keys, the tied embedding once;
# - folders written by scripts/export_model.py: our config (model_type "minimind-v") and
#   model.safetensors with the keys under `model.`.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def folder_config(folder: str) -> Optional[dict]:
    """The folder's config.json as a dict, or None if it has none (or not a readable one)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_weights_folder(path: str) -> bool:
    config = folder_config(path) if os.path.isdir(path) else None
    return config is not None and (config.get("model_type") == VLMConfig.model_type
                                   or {"dim", "n_layers"} <= set(config))


def _read_folder_weights(folder: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not is_weights_folder(folder):
        raise CheckpointError(f"{folder} is not a MiniMind-V weights folder: no config.json with "
                              f"model_type {VLMConfig.model_type!r} or the original's dim and n_layers")
    path = next((os.path.join(folder, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))), None)
    if path is None:
        raise FileNotFoundError(f"{folder} holds no weights: expected {' or '.join(WEIGHT_FILES)}")
    if path.endswith(".safetensors"):
        check_not_lfs_pointer(path)
        try:
            sd = load_file(path)
        except Exception as e:  # a truncated or damaged file
            raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt ({e})") from None
    else:
        sd = load_torch_file(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    return normalize_state_dict({k[len(EXPORT_PREFIX):] if k.startswith(EXPORT_PREFIX) else k: v
                                 for k, v in sd.items()})


def config_for(path: str, sd: Dict[str, torch.Tensor]) -> VLMConfig:
    """The config of the weights `sd` read from `path`: an export's own config.json; otherwise
    the size read off the weight shapes, with the head count of an original folder's config
    (a `.pth` file has none: see config_from_state_dict)."""
    config = folder_config(path) if os.path.isdir(path) else None
    if config and config.get("model_type") == VLMConfig.model_type:
        return VLMConfig.from_pretrained(path)
    heads = {"n_heads": config["n_heads"]} if config and isinstance(config.get("n_heads"), int) else {}
    return config_from_state_dict(sd, path, **heads)


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
    lacks = ", ".join(missing) or "the feed-forward weights"
    raise CheckpointError(f"not a MiniMind-V checkpoint: {name} lacks {lacks} (it holds {found})")


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
        config = config_for(weights, sd) if sd is not None else VLMConfig(**config_overrides)
    if vision_model_path:
        config.vision_model_path = vision_model_path
    encoder = VisionEncoder.from_pretrained(config.vision_model_path, layer=config.vision_layer,
                                            squash=config.squash_images)
    config.vision_hidden_size = encoder.hidden_size
    model = MiniMindVLM(config, encoder)
    if sd is not None:
        load_weights(model, sd, name=weights)
    return model.to(device)
