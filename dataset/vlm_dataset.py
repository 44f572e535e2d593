"""The dataset layer: records (from any source, see records.py) -> token ids, labels, pictures.

A data path is JSON/JSONL with an images folder (the original v1 layout) or Parquet with the
pictures inside (the official layout since 2025-12; a file, a folder of shards or a glob). A
JSON record:

    {"id": 7, "image": "a.jpg, b.jpg",
     "conversations": [{"from": "human", "value": "<image>\\n<image>\\nWhat differs?"},
                       {"from": "gpt", "value": "..."}]}

Turns may also be written {"role": "user"|"assistant", "content": ...}. The n-th `<image>` mark
(counted over the user turns) is the n-th picture. An empty "image" string means a text-only
record (no marks allowed then); a Parquet row without marks is text-only whatever its picture
column holds.

Bad data is skipped, never fatal (unless strict=True):
* JSON sources run the cheap checks (JSON, UTF-8, fields, turn order, mark/picture counts,
  files inside the images folder, present and not empty) while indexing; Parquet sources
  check each row when it is read (indexing a million rows parses none of them);
* __getitem__ runs the rest (parsing, full picture decode, token length) and returns a
  `Skipped` object instead of raising, even with strict=True. DataLoader workers cannot update
  the parent's counters (nor stop a run in one line), so the skip travels inside the batch
  (`batch["skipped"]`); the trainer hands each pair back to `dataset.report(ref, reason)` in
  the main process, which counts it (or, strict, raises the one-line error).
Every reason reads "<kind>" or "<kind>: <detail>"; `summary()` counts problems per kind.
"""
import logging
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.records import BadRecord, Frame, conversation, open_records
from model.config import IGNORE_INDEX, IMAGE_MARK
from model.prompt import DEFAULT_FRAMES, count_placeholders, encode_conversation
from model.video import VideoError, read_keyframes
from model.vision import ImageError, load_image

# The trainers' --max_seq_len, and what scripts/check_data.py checks against by default.
DEFAULT_MAX_SEQ_LEN = 640

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """Returned by __getitem__ instead of a sample that turned out to be unusable."""
    index: int
    record_ref: str
    reason: str


def load_pictures(pictures) -> list:
    """A record's pictures as RGB images: files and bytes through load_image, clip frames through
    read_keyframes (each clip decoded once); BadRecord (one line) for any that cannot be read."""
    clips, images = {}, []
    for picture in pictures:
        try:
            if isinstance(picture, Frame):
                clip = (picture.video if isinstance(picture.video, str) else id(picture.video), picture.count)
                if clip not in clips:
                    clips[clip] = read_keyframes(picture.video, picture.count)
                images.append(clips[clip][picture.index])
            else:
                images.append(load_image(picture))
        except ImageError as e:
            raise BadRecord(f"image cannot be decoded: {e}") from None
        except VideoError as e:
            raise BadRecord(f"video cannot be decoded: {e}") from None
    return images


def problem_kinds(problems) -> Counter:
    """How many (record_ref, reason) problems of each kind (a reason's part before any ":")."""
    return Counter(reason.partition(":")[0] for _, reason in problems)


def summarize(problems, header: str = "") -> str:
    """A short text: the header, then how many problems of each kind (one line when none)."""
    if not problems:
        return f"{header}, no problems" if header else "no problems"
    counts = problem_kinds(problems)
    lines = [header] if header else []
    lines.append(f"{len(problems)} problem(s)" + (":" if counts else ""))
    lines += [f"  {n:6d}  {kind}" for kind, n in counts.most_common()]
    return "\n".join(lines)


class VLMDataset(Dataset):
    """Conversation records with pictures -> {"input_ids", "labels", "pixel_values" | "image_features"}.

    Items hold "pixel_values" = preprocess(the pictures, as load_image opens them), a tensor
    [n_images, 3, H, W] (None for a text-only sample); after `use_features(store)` they hold
    "image_features" [n_images, 50, width] read from the feature cache instead, and the
    pictures are never read.
    """

    def __init__(self, data_path: str, images_dir: Optional[str], tokenizer, image_ids: Sequence[int],
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN, max_turns: Optional[int] = None,
                 image_prefix: Optional[str] = None,
                 max_images: Optional[int] = None, strict: bool = False,
                 preprocess: Optional[Callable] = None, log_limit: Optional[int] = None, frames: int = DEFAULT_FRAMES):
        if max_turns is not None and max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, not {max_turns}")
        self.data_path = data_path
        self.source = open_records(data_path, images_dir, image_prefix, max_images, frames)
        self.tokenizer = tokenizer
        self.image_ids = list(image_ids)
        self.max_seq_len = max_seq_len
        self.max_turns = max_turns
        self.max_images = max_images
        self.strict = strict
        self.preprocess = preprocess
        self.features = None
        # Problems logged one by one (None: all); the rest are counted, for summary(). Under
        # torchrun only rank 0 logs (0 on the others); every rank counts.
        self.log_limit = log_limit
        self.indices = np.arange(len(self.source), dtype=np.int64)   # source rows still in use

        self.problems: List[tuple] = []  # (record_ref, reason), one per bad record
        self._reported = set()
        for ref, reason in getattr(self.source, "load_problems", ()):
            self.report(ref, reason)
        self._shared = len(self.problems)  # every rank finds the same load-time problems
        note = getattr(self.source, "prefix_note", None)
        if note and self.log_limit != 0:
            logger.warning("%s", note)

    # ---- problems -------------------------------------------------------------------------

    def report(self, ref: str, reason: str) -> None:
        """Log and count a problem once per record; with strict=True raise ValueError instead.

        Also call this in the main process for every (ref, reason) of `batch["skipped"]`.
        """
        message = f"{ref}: {reason}"
        if self.strict:
            raise ValueError(message)
        if ref in self._reported:  # the same record comes back every epoch
            return
        self._reported.add(ref)
        self.problems.append((ref, reason))
        logged = len(self.problems) if self.log_limit is None else self.log_limit
        if len(self.problems) <= logged:
            logger.warning("%s", message)
        elif len(self.problems) == logged + 1 and logged:
            logger.warning("more bad records than %d: from here on they are counted, not logged one by one "
                           "(a summary by kind after every epoch; scripts/check_data.py lists them all)", logged)

    def take_new_problems(self) -> List[tuple]:
        """Problems found since the last call, for sharing with the other ranks."""
        new, self._shared = self.problems[self._shared:], len(self.problems)
        return new

    def summary(self) -> str:
        n_read = getattr(self.source, "n_read", len(self.source))
        return summarize(self.problems, f"{self.data_path}: {n_read} record(s), {len(self)} in use")

    # ---- pictures from the feature cache --------------------------------------------------

    def use_features(self, store) -> None:
        """Read every sample's pictures as cached CLIP features from `store` (see
        trainer/feature_cache.py); samples whose pictures could not be encoded are reported
        and left out."""
        self.features = store
        usable = np.ones(len(self.indices), dtype=bool)
        for position, i in enumerate(self.indices.tolist()):
            reason = store.problem(i)
            if reason:
                self.report(self.source.ref(i), reason)
                usable[position] = False
        self.indices = self.indices[usable]

    def read_groups(self):
        """(group of every sample, window) for sources whose samples are cheap to read together
        in groups (Parquet row groups; see ParquetRecords.read_groups), else None."""
        if not hasattr(self.source, "read_groups"):
            return None
        starts, window = self.source.read_groups(with_pictures=self.features is None)
        return np.searchsorted(starts, self.indices, side="right") - 1, window

    @property
    def approx_lengths(self) -> np.ndarray:
        """Cheap token-length estimates, for batching samples of similar length."""
        return self.source.approx_lengths[self.indices]

    # ---- items ----------------------------------------------------------------------------

    def _limit_turns(self, messages):
        return messages if self.max_turns is None else messages[: 2 * self.max_turns]

    def _fit(self, messages):
        """Encode the longest prefix of complete user/assistant pairs within max_seq_len.

        Cutting between pairs never splits an image span or an answer from its `</s>`, and the
        images of the dropped turns are dropped with them (their marks come after the kept ones).
        """
        ids = []
        for pairs in range(len(messages) // 2, 0, -1):  # usually the first try fits
            kept = messages[: 2 * pairs]
            ids, mask = encode_conversation(self.tokenizer, kept, self.image_ids)
            if len(ids) <= self.max_seq_len:
                return kept, ids, mask
        raise BadRecord(f"longer than max_seq_len={self.max_seq_len}: "
                        f"the first turn pair alone has {len(ids)} tokens")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        row = int(self.indices[index])
        try:
            if self.features is not None:
                raw = self.source.read(row, with_pictures=False)
                features = self.features.of(row)
                n_pictures = len(features)
            else:
                raw = self.source.read(row)
                n_pictures = len(raw.pictures)
            try:
                messages = conversation(raw.turns, n_pictures, self.max_images)
            except BadRecord:
                if self.features is not None and not n_pictures:
                    self.source.read(row)   # no picture cached: if they are unreadable, say that instead
                raise
            kept, ids, mask = self._fit(self._limit_turns(messages))
            n_images = sum(m["content"].count(IMAGE_MARK) for m in kept if m["role"] == "user")
            # The model swaps placeholder spans for pictures in order: they must match.
            found = count_placeholders(ids, self.image_ids)
            if found != n_images:
                raise BadRecord(f"placeholder count mismatch: {found} span(s) in the ids "
                                f"for {n_images} image(s)")
            item = {"input_ids": torch.tensor(ids, dtype=torch.long),
                    "labels": torch.tensor([t if m else IGNORE_INDEX for t, m in zip(ids, mask)],
                                           dtype=torch.long),
                    "index": index, "id": raw.record_id, "n_images": n_images}
            if self.features is not None:
                item["image_features"] = features[:n_images] if n_images else None
            else:
                item["pixel_values"] = self._pixels(raw.pictures[:n_images])
        except BadRecord as bad:
            return Skipped(index, self.source.ref(row), str(bad))
        return item

    def _pixels(self, pictures) -> Optional[torch.Tensor]:
        if not pictures:
            return None
        pixels = self.preprocess(load_pictures(pictures))
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or len(pixels) != len(pictures):
            raise TypeError(f"preprocess must return a tensor [{len(pictures)}, 3, H, W], "
                            f"got {getattr(pixels, 'shape', type(pixels))}")
        return pixels


def collate(batch, pad_id: int = 0) -> dict:
    """Pad a list of items (right padding, to the longest sample) into a batch.

    `Skipped` items are dropped and listed in "skipped" as (record_ref, reason) pairs. If every
    item was skipped the batch has B=0: input_ids/labels/attention_mask of shape [0, 0]; the
    trainer keeps its processes in step with an empty pass. "pixel_values" (or
    "image_features") concatenates the pictures of all samples in order ([N_total, ...]) and is
    None when no sample has one; "images_per_sample" splits them.
    """
    items = [x for x in batch if not isinstance(x, Skipped)]
    longest = max((len(x["input_ids"]) for x in items), default=0)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for b, x in enumerate(items):
        n = len(x["input_ids"])
        input_ids[b, :n] = x["input_ids"]
        labels[b, :n] = x["labels"]
        attention_mask[b, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
           "images_per_sample": torch.tensor([x["n_images"] for x in items], dtype=torch.long),
           "skipped": [(x.record_ref, x.reason) for x in batch if isinstance(x, Skipped)],
           "indices": [x["index"] for x in items], "ids": [x["id"] for x in items]}
    for key in ("pixel_values", "image_features"):
        pictures = [x[key] for x in items if x.get(key) is not None]
        out[key] = torch.cat(pictures) if pictures else None
    return out


def make_collate(pad_id: int = 0):
    """A picklable collate_fn (DataLoader workers may be spawned) with a fixed pad id."""
    return partial(collate, pad_id=pad_id)
