"""Cached CLIP features: encode every image once with the frozen tower, train from the cache after.

CLIP is frozen, so its output for an image never changes; re-encoding it every epoch is pure
waste (for the 27M model CLIP costs more than the LLM). The cache is a folder of memory-mapped
fp16 `.npy` shards plus an index, under a folder named after the vision model's fingerprint:
- a different vision model (weights, config, hooked layer, preprocessing) -> another folder;
- a changed image file (path, size or modification time) -> another key, encoded again;
- the same file used by many records (or reached through a symlink) is encoded once.
Under DDP every rank encodes its share of the missing images into its own shard, then rank 0
merges the index; the folder is shared by all ranks (and by later runs).
"""
import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from model.vision import load_image


def encoder_fingerprint(encoder) -> str:
    """A digest of everything that changes the features: config, hooked layer, preprocessing
    and the weights (by cheap per-tensor statistics, not a full byte hash of 350 MB)."""
    h = hashlib.sha1()
    h.update(encoder.clip.config.to_json_string().encode())
    pre = encoder.preprocess
    h.update(json.dumps([encoder.layer_index, pre.squash, pre.size,
                         pre.processor.to_json_string()]).encode())
    for name, p in encoder.clip.state_dict().items():
        t = p.detach().double()
        h.update(f"{name}{tuple(t.shape)}{t.sum().item():.10e}{t.square().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def image_key(path: str) -> str:
    # realpath: a picture reached through a symlink (the demo's SFT sets link the pretrain
    # pictures) is the same picture, encoded once.
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def _write_json_atomic(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class _ImageFiles(Dataset):
    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, self.preprocess([load_image(self.paths[i])])[0], None
        except Exception as e:  # a corrupt image is reported, never fatal here
            return i, None, f"image unreadable: {self.paths[i]}: {type(e).__name__}: {e}"


def _collate(items):
    return items


class FeatureCache:
    def __init__(self, root: str, encoder):
        self.encoder = encoder
        self.dir = os.path.join(root, encoder_fingerprint(encoder))
        self.index: Dict[str, object] = {}
        self._shards: Dict[str, np.ndarray] = {}

    @property
    def index_path(self):
        return os.path.join(self.dir, "index.json")

    def _load_index(self):
        if os.path.exists(self.index_path):
            with open(self.index_path) as f:
                self.index = json.load(f)

    def build(self, paths: Sequence[str], device, batch_size: int = 64, num_workers: int = 0,
              rank: int = 0, world_size: int = 1, barrier=lambda: None, progress: bool = True) -> Dict[str, str]:
        """Encode the images of `paths` that the cache lacks. Returns {path: reason} for images
        that could not be read (the caller drops their records)."""
        from tqdm import tqdm

        os.makedirs(self.dir, exist_ok=True)
        self._load_index()
        keys = {p: image_key(p) for p in dict.fromkeys(paths)}   # unique, in order
        missing = [p for p, k in keys.items() if k not in self.index]
        mine = missing[rank::world_size]
        part = {}
        if mine:
            shard_name = f"shard-{len(os.listdir(self.dir))}-{os.getpid()}-r{rank}.npy"
            n_tok, width = self.encoder_output_shape()
            shard = np.lib.format.open_memmap(os.path.join(self.dir, shard_name), mode="w+",
                                              dtype=np.float16, shape=(len(mine), n_tok, width))
            loader = DataLoader(_ImageFiles(mine, self.encoder.preprocess), batch_size=batch_size,
                                num_workers=num_workers, collate_fn=_collate)
            bar = tqdm(total=len(mine), desc="caching CLIP features", disable=not progress, unit="img")
            for items in loader:
                good = [(i, px) for i, px, err in items if err is None]
                for i, _, err in items:
                    if err is not None:
                        part[keys[mine[i]]] = {"bad": err}
                if good:
                    feats = self.encoder(torch.stack([px for _, px in good]).to(device))
                    rows = [i for i, _ in good]
                    shard[rows] = feats.float().cpu().numpy().astype(np.float16)
                    for i in rows:
                        part[keys[mine[i]]] = [shard_name, i]
                bar.update(len(items))
            bar.close()
            shard.flush()
            del shard
        _write_json_atomic(part, os.path.join(self.dir, f"part-r{rank}.json"))
        barrier()
        if rank == 0:   # merge the parts into the index, atomically
            self._load_index()
            for r in range(world_size):
                part_path = os.path.join(self.dir, f"part-r{r}.json")
                with open(part_path) as f:
                    self.index.update(json.load(f))
                os.unlink(part_path)
            _write_json_atomic(self.index, self.index_path)
        barrier()
        self._load_index()
        self._keys = keys
        return {p: self.index[k]["bad"] for p, k in keys.items() if isinstance(self.index.get(k), dict)}

    def encoder_output_shape(self):
        cfg = self.encoder.clip.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size

    def lookup(self, paths: List[str]) -> Optional[torch.Tensor]:
        """Features [N, tokens, width] (fp16) of images that `build` has seen."""
        if not paths:
            return None
        rows = []
        for p in paths:
            key = self._keys.get(p) or image_key(p)
            shard_name, row = self.index[key]
            if shard_name not in self._shards:
                self._shards[shard_name] = np.load(os.path.join(self.dir, shard_name), mmap_mode="r")
            rows.append(self._shards[shard_name][row])
        return torch.from_numpy(np.stack(rows))
