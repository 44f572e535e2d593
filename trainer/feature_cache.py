"""Cached CLIP features: encode every picture once with the frozen tower, train from the cache after.

CLIP is frozen, so its output for a picture never changes; re-encoding it every epoch is pure
waste (for the 27M model CLIP costs more than the LLM). A picture is known by a 16-byte key:
a hash of its bytes (Parquet rows; a picture shared by many rows is encoded once) or of its
file's real path, size and modification time (picture files; a changed file is encoded anew,
a symlink reaches the same entry). Under `<cache_dir>/<vision model fingerprint>/`:

    shards.json            [[name, rows], ...]: feature rows, in order (row ids run across them)
    shard-*.npy            fp16 [rows, tokens, width], memory-mapped when read
    keys.npy, rows.npy     the index: sorted keys and their row ids (compact at a million keys)
    bad.json               {key: reason} for pictures that could not be decoded
    map-*.npz              a Parquet dataset's samples -> row ids (found again without hashing)

A different vision model (weights, config, hooked layer, preprocessing) gets another folder.

Several processes: the ranks that see the same folder (all of them on a shared filesystem,
one node's ranks on a local disk: found by each rank writing a file and looking which others
appear) split the samples into contiguous blocks, encode what their block lacks into shards of
their own, and the group's first rank merges the index. So `torchrun --nnodes N` works with a
shared cache folder, and with a folder on each node's own disk, where each node encodes the
pictures itself and no file written on one node is read on another.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dataset.records import BadRecord, Frame
from dataset.vlm_dataset import load_pictures
from model.checkpoint import atomic_output

NO_ROW = -1


def encoder_fingerprint(encoder) -> str:
    """A digest of everything that changes the features: config, hooked layer, preprocessing
    and the weights (by cheap per-tensor statistics, not a full byte hash of 350 MB)."""
    h = hashlib.sha1()
    h.update(encoder.clip.config.to_json_string().encode())
    pre = encoder.preprocess
    h.update(json.dumps([encoder.layer_index, pre.squash, pre.size,
                         pre.processor.to_json_string()]).encode())
    for name, p in encoder.clip.state_dict().items():
        t = p.detach().cpu().double()   # summed on the CPU: the same key whichever device runs CLIP
        h.update(f"{name}{tuple(t.shape)}{t.sum().item():.10e}{t.square().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def picture_key(picture) -> bytes:
    """16 bytes naming a picture: a hash of its bytes, or of a file's real path, size and time;
    a clip's keyframe: its clip's key, its index and how many keyframes were taken."""
    if isinstance(picture, Frame):
        clip = picture_key(picture.video)
        return hashlib.blake2b(clip + f"|{picture.index}/{picture.count}".encode(), digest_size=16).digest()
    if isinstance(picture, (bytes, bytearray, memoryview)):
        return hashlib.blake2b(picture, digest_size=16).digest()
    st = os.stat(picture)
    identity = f"{os.path.realpath(picture)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.blake2b(identity.encode("utf-8", "surrogateescape"), digest_size=16).digest()


class CacheFull(ValueError):
    """No room on the disk for the features of the pictures to encode (a one-line error)."""


def reserve_disk_space(shard_path: str, n_pictures: int):
    """Allocate the whole of a new (sparse) shard file before encoding into it: a memory-mapped
    write that finds the disk full kills the process with SIGBUS, hours into the encoding,
    where this fails at once with a line saying how much room is needed."""
    size = os.path.getsize(shard_path)
    try:
        with open(shard_path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):   # a filesystem that cannot reserve: go on unchecked
            return
        os.unlink(shard_path)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        folder = os.path.dirname(shard_path)
        free = shutil.disk_usage(folder).free
        raise CacheFull(f"no space for the CLIP feature cache in {folder}: {n_pictures} new picture(s) need "
                        f"{size / 1e6:,.1f} MB, {free / 1e6:,.1f} MB is free; put --cache_dir on a bigger disk, "
                        f"or train without --cache_features") from None


def progress_bar(iterable=None, **options):
    """tqdm, redrawn at most once a minute when written to a file rather than a terminal: the
    log of a run under nohup or a job scheduler stays small through an hour of encoding."""
    from tqdm import tqdm

    return tqdm(iterable, mininterval=0.1 if sys.stderr.isatty() else 60, **options)


def _save_atomic(path, write):
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _save_json(path, obj):
    _save_atomic(path, lambda f: f.write(json.dumps(obj).encode()))


class FeatureStore:
    """The cached features of one dataset's samples, for the dataset's __getitem__.

    Small and picklable (DataLoader workers get a copy): row ids per sample plus the shard
    table; the shards are memory-mapped when first read in each process.
    """

    def __init__(self, folder, shards, offsets, rows, problems):
        self.folder, self.shards = folder, shards
        self.shard_starts = np.cumsum([0] + [n for _, n in shards], dtype=np.int64)
        self.offsets, self.rows, self.problems = offsets, rows, problems   # sample i: rows[offsets[i]:offsets[i+1]]
        self._maps = {}

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def problem(self, sample: int) -> Optional[str]:
        return self.problems.get(sample)

    def of(self, sample: int) -> torch.Tensor:
        """Features [n_pictures, tokens, width] (fp16) of a sample's pictures, in order."""
        rows = self.rows[self.offsets[sample]:self.offsets[sample + 1]]
        if (rows == NO_ROW).any():
            raise BadRecord(self.problems.get(sample, "image cannot be decoded"))
        features = [self._shard_row(int(r)) for r in rows]
        if not features:
            return torch.zeros(0)
        return torch.from_numpy(np.stack(features))

    def _shard_row(self, row: int) -> np.ndarray:
        k = int(np.searchsorted(self.shard_starts, row, side="right")) - 1
        name = self.shards[k][0]
        if name not in self._maps:
            self._maps[name] = np.load(os.path.join(self.folder, name), mmap_mode="r")
        return self._maps[name][row - self.shard_starts[k]]


class _Missing(Dataset):
    """Pictures to encode, a sample's at a time (a clip is decoded once for all its keyframes),
    decoded and preprocessed in DataLoader workers. Item k: [(j, pixels or None, reason), ...]
    for the missing pictures j of samples[k]."""

    def __init__(self, source, missing, preprocess):
        self.source, self.preprocess = source, preprocess
        self.samples = {}
        for j, (sample, slot, _) in enumerate(missing):
            self.samples.setdefault(sample, []).append((j, slot))
        self.samples = list(self.samples.items())

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, k):
        sample, wanted = self.samples[k]
        try:
            pictures = self.source.read(sample).pictures
            pixels = self.preprocess(load_pictures([pictures[slot] for _, slot in wanted]))
            return [(j, px, None) for (j, _), px in zip(wanted, pixels)]
        except (BadRecord, OSError) as e:   # reported for the sample, never fatal here
            reason = str(e).splitlines()[0]
            reason = reason if reason.startswith(("image", "video")) else f"image cannot be decoded: {reason}"
            return [(j, None, reason) for j, _ in wanted]


def _flatten(samples):
    return [entry for sample in samples for entry in sample]


class FeatureCache:
    def __init__(self, root: str, encoder):
        self.encoder = encoder
        self.dir = os.path.join(root, encoder_fingerprint(encoder))

    # ---- the index ------------------------------------------------------------------------
    def _read_index(self):
        keys_path = os.path.join(self.dir, "keys.npy")
        if not os.path.exists(keys_path):
            return np.zeros(0, dtype="S16"), np.zeros(0, dtype=np.int64), [], {}
        with open(os.path.join(self.dir, "shards.json")) as f:
            shards = json.load(f)
        with open(os.path.join(self.dir, "bad.json")) as f:
            bad = json.load(f)
        return np.load(keys_path), np.load(os.path.join(self.dir, "rows.npy")), shards, bad

    @staticmethod
    def _lookup(keys, rows, wanted):
        """Row ids of `wanted` keys (NO_ROW where absent)."""
        if not len(keys) or not len(wanted):
            return np.full(len(wanted), NO_ROW, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        return np.where(keys[at] == wanted, rows[at], NO_ROW)

    # ---- building -------------------------------------------------------------------------
    def prepare(self, source, device, rank: int = 0, world_size: int = 1, all_gather=None, barrier=None,
                batch_size: int = 64, num_workers: int = 0, progress: bool = True) -> FeatureStore:
        """Encode the pictures of `source` that the cache lacks and return the store of its samples.
        `all_gather(obj) -> [obj per rank]` and `barrier()` are needed when world_size > 1."""
        os.makedirs(self.dir, exist_ok=True)
        barrier = barrier or (lambda: None)
        token = all_gather(uuid.uuid4().hex)[0] if world_size > 1 else uuid.uuid4().hex
        group = self._group(token, rank, world_size, barrier)
        member, size = group.index(rank), len(group)
        fingerprint = getattr(source, "fingerprint", None)
        map_path = os.path.join(self.dir, f"map-{fingerprint}.npz") if fingerprint else None
        found = bool(map_path) and os.path.exists(map_path)
        if all(all_gather(found) if world_size > 1 else [found]):   # every rank's folder has it
            return self._store(map_path)
        lo, hi = len(source) * member // size, len(source) * (member + 1) // size
        try:
            self._encode_block(source, lo, hi, token, rank, device, batch_size, num_workers, progress)
            problem = None
        except CacheFull as e:
            problem = str(e)
        # Also the barrier after encoding: a rank whose disk is full stops every rank, with its line.
        problem = next((p for p in (all_gather(problem) if world_size > 1 else [problem]) if p), None)
        if problem:
            raise CacheFull(problem)
        out = map_path or os.path.join(self.dir, f".map-{token}.npz")
        if rank == group[0]:
            with self._locked():
                self._merge([f".part-{token}-r{r}.npz" for r in group], out)
        barrier()
        store = self._store(out)
        barrier()
        if not map_path and rank == group[0]:
            os.unlink(out)
        return store

    def _group(self, token, rank, world_size, barrier):
        """The ranks that see this cache folder (all, on a shared filesystem; a node's, on a
        local disk), sorted: each rank leaves a file, then looks whose files it can see."""
        if world_size == 1:
            return [0]
        folder = os.path.join(self.dir, f".members-{token}")
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, str(rank)), "w").close()
        barrier()
        group = sorted(int(name) for name in os.listdir(folder))
        barrier()
        if rank == group[0]:
            for name in os.listdir(folder):
                os.unlink(os.path.join(folder, name))
            os.rmdir(folder)
        return group

    def _encode_block(self, source, lo, hi, token, rank, device, batch_size, num_workers, progress):
        """Key the pictures of samples lo..hi, encode those the cache lacks into a shard of this
        rank's own, and write a part file for the merge."""
        keys, rows, _, bad = self._read_index()
        offsets, sample_keys, missing, seen = [0], [], [], set()
        for sample, pictures in progress_bar(source.iter_pictures(lo, hi), total=hi - lo, desc="keying pictures",
                                             disable=not progress, unit=" samples"):
            for slot, picture in enumerate(pictures):
                try:
                    key = picture_key(picture)
                except OSError:   # a file gone since indexing: its encoding fails and says so
                    key = hashlib.blake2b(b"unreadable|" + os.fsencode(picture), digest_size=16).digest()
                sample_keys.append(key)
                if key not in seen and key.hex() not in bad:
                    seen.add(key)
                    missing.append((sample, slot, key))
            offsets.append(len(sample_keys))
        sample_keys = np.array(sample_keys, dtype="S16")
        if missing:   # keep only what the index lacks
            found = self._lookup(keys, rows, np.array([k for _, _, k in missing], dtype="S16"))
            missing = [m for m, row in zip(missing, found) if row == NO_ROW]
        shard_name, problems = f"shard-{token}-r{rank}.npy", {}
        if missing:
            tokens, width = self.encoder_output_shape()
            shard_path = os.path.join(self.dir, shard_name)
            shard = np.lib.format.open_memmap(shard_path, mode="w+", dtype=np.float16,
                                              shape=(len(missing), tokens, width))
            reserve_disk_space(shard_path, len(missing))
            loader = DataLoader(_Missing(source, missing, self.encoder.preprocess), batch_size=batch_size,
                                num_workers=num_workers, collate_fn=_flatten)
            bar = progress_bar(total=len(missing), desc="caching CLIP features", disable=not progress, unit="img")
            for items in loader:
                good = [(j, px) for j, px, err in items if err is None]
                problems.update({missing[j][2].hex(): err for j, _, err in items if err is not None})
                if good:
                    feats = self.encoder(torch.stack([px for _, px in good]).to(device))
                    shard[[j for j, _ in good]] = feats.float().cpu().numpy().astype(np.float16)
                bar.update(len(items))
            bar.close()
            shard.flush()
            del shard
        np.savez(os.path.join(self.dir, f".part-{token}-r{rank}.npz"), lo=lo, offsets=np.array(offsets),
                 sample_keys=sample_keys, new_keys=np.array([k for _, _, k in missing], dtype="S16"),
                 shard=shard_name if missing else "", problems=json.dumps(problems))

    @contextlib.contextmanager
    def _locked(self):
        """One merge at a time, also between separate runs sharing the folder."""
        with open(os.path.join(self.dir, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _merge(self, part_names, out_path):
        keys, rows, shards, bad = self._read_index()
        parts = []
        for name in part_names:
            path = os.path.join(self.dir, name)
            with np.load(path) as part:
                parts.append({k: part[k] for k in part.files})
            os.unlink(path)
        new_keys, new_rows = [keys], [rows]
        total = sum(n for _, n in shards)
        for part in parts:
            problems = json.loads(str(part["problems"]))
            bad.update(problems)
            if str(part["shard"]):
                n = len(part["new_keys"])
                shards.append([str(part["shard"]), n])
                good = np.array([k.hex() not in problems for k in part["new_keys"].tolist()], dtype=bool)
                new_keys.append(part["new_keys"][good])
                new_rows.append(total + np.arange(n, dtype=np.int64)[good])
                total += n
        keys, rows = np.concatenate(new_keys), np.concatenate(new_rows)
        keys, first = np.unique(keys, return_index=True)   # a picture two ranks both encoded: keep one
        rows = rows[first]
        _save_atomic(os.path.join(self.dir, "rows.npy"), lambda f: np.save(f, rows))
        _save_json(os.path.join(self.dir, "bad.json"), bad)
        _save_json(os.path.join(self.dir, "shards.json"), shards)
        _save_atomic(os.path.join(self.dir, "keys.npy"), lambda f: np.save(f, keys))
        # This dataset's samples -> row ids, in sample order (the parts are contiguous blocks).
        parts.sort(key=lambda p: int(p["lo"]))
        sample_keys = np.concatenate([p["sample_keys"] for p in parts]) if parts else np.zeros(0, "S16")
        offsets, base = [np.zeros(1, dtype=np.int64)], 0
        for p in parts:
            offsets.append(p["offsets"][1:] + base)
            base += int(p["offsets"][-1])
        sample_rows = self._lookup(keys, rows, sample_keys)
        _save_atomic(out_path, lambda f: np.savez(f, offsets=np.concatenate(offsets), rows=sample_rows,
                                                  keys=sample_keys, shards=json.dumps(shards),
                                                  created=time.time()))

    def _store(self, map_path) -> FeatureStore:
        _, _, _, bad = self._read_index()
        with np.load(map_path) as m:
            offsets, rows, keys, shards = m["offsets"], m["rows"], m["keys"], json.loads(str(m["shards"]))
        problems = {}
        missing_so_far = np.concatenate([[0], np.cumsum(rows == NO_ROW)])
        for sample in np.nonzero(missing_so_far[offsets[1:]] > missing_so_far[offsets[:-1]])[0]:
            lo, hi = offsets[sample], offsets[sample + 1]
            first_bad = next(k for k, r in zip(keys[lo:hi], rows[lo:hi]) if r == NO_ROW)
            problems[int(sample)] = bad.get(first_bad.hex(), "image cannot be decoded")
        return FeatureStore(self.dir, shards, offsets, rows, problems)

    def encoder_output_shape(self):
        cfg = self.encoder.clip.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size
