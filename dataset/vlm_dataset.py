"""The dataset layer: MiniMind-V conversation records -> token ids, labels and images.

A data file is a JSON list of records or JSONL (one record a line). A record:

    {"id": 7, "image": "a.jpg, b.jpg",
     "conversations": [{"from": "human", "value": "<image>\\n<image>\\nWhat differs?"},
                       {"from": "gpt", "value": "..."}]}

Turns may also be written {"role": "user"|"assistant", "content": ...}. The n-th `<image>` mark
(counted over the user turns) is the n-th file of "image"; files live in `images_dir`, and
`image_prefix` is put before every name (the COCO SFT data needs "COCO_train2014_").
An empty "image" string means a text-only record (no marks allowed then).

Bad data is skipped, never fatal (unless strict=True), in two places:
* at construction, cheap checks (JSON, UTF-8, fields, turn order, mark/image counts, files exist
  inside the images folder and are not empty) drop bad records and log one warning line each;
* in __getitem__, costly checks (full image decode, token length) return a `Skipped` object
  instead of raising, even with strict=True. DataLoader workers cannot update the parent's
  counters (nor stop a run in one line), so the skip travels inside the batch
  (`batch["skipped"]`); the trainer hands each pair back to `dataset.report(ref, reason)` in
  the main process, which counts it (or, strict, raises the one-line error).
Every reason reads "<kind>" or "<kind>: <detail>"; `summary()` counts problems per kind.
"""
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from model.config import IGNORE_INDEX, IMAGE_MARK
from model.prompt import count_placeholders, encode_conversation
from model.vision import ImageError, load_image

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TEMPLATE_TOKENS_PER_TURN = 8  # rough cost of "<s>user\n ... </s>\n" in `approx_lengths`


@dataclass(frozen=True)
class Skipped:
    """Returned by __getitem__ instead of a sample that turned out to be unusable."""
    index: int
    record_ref: str
    reason: str


class _Bad(Exception):
    """A problem with one record; the message is the reason ("kind" or "kind: detail")."""


def _valid_unicode(obj) -> bool:
    """False if any string holds a lone surrogate: a byte that was not UTF-8 (decoded with
    surrogateescape) or a "\\udXXX" escape. Either would break tokenization later."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(obj, dict):
        return all(_valid_unicode(k) and _valid_unicode(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_valid_unicode(v) for v in obj)
    return True


def read_records(path: str):
    """Yield (ref, record, error) for every record of a JSON-list or JSONL file.

    `ref` names the file and the line (JSONL) or list index (JSON); `error` is a reason string
    when the record could not be parsed (then `record` is None). A JSON list that does not parse
    as a whole cannot be split into records, so that raises ValueError.
    """
    with open(path, "rb") as f:
        first = next((line.strip() for line in f if line.strip()), b"")
        is_list = first.lstrip(b"\xef\xbb\xbf").startswith(b"[")  # ignore a UTF-8 BOM
        f.seek(0)
        if is_list:
            # Bad bytes survive as lone surrogates, so only the record holding them is rejected.
            text = f.read().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a valid JSON list ({e})") from None
            if not isinstance(records, list):
                raise ValueError(f"{path}: the JSON file must hold a list of records")
            for i, record in enumerate(records):
                yield f"{path} record [{i}]", record, None
            return
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            ref = f"{path} line {n}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield ref, None, f"text is not valid UTF-8: byte {e.start} of the line"
                continue
            try:
                yield ref, json.loads(text.lstrip("\ufeff")), None
            except json.JSONDecodeError as e:
                yield ref, None, f"malformed JSON: {e.msg} at column {e.colno}"


def summarize(problems, header: str = "") -> str:
    """A short multi-line text: the header, then how many problems of each kind."""
    counts = Counter(reason.partition(":")[0] for _, reason in problems)
    lines = [header] if header else []
    lines.append(f"{len(problems)} problem(s)" + (":" if counts else ""))
    lines += [f"  {n:6d}  {kind}" for kind, n in counts.most_common()]
    return "\n".join(lines)


class VLMDataset(Dataset):
    """Conversation records with images -> {"input_ids", "labels", "pixel_values" | ...}.

    image_mode="pixels": items hold "pixel_values" = preprocess(list of PIL RGB images), a
    FloatTensor [n_images, 3, H, W] (None for a text-only sample).
    image_mode="paths": items hold only "image_paths" (no decoding), for the feature cache.
    Items always hold "image_paths": the absolute paths of the images the kept turns use.
    """

    def __init__(self, data_path: str, images_dir: str, tokenizer, image_ids: Sequence[int],
                 max_seq_len: int = 512, max_turns: Optional[int] = None, image_prefix: str = "",
                 max_images: Optional[int] = None, strict: bool = False,
                 image_mode: str = "pixels", preprocess: Optional[Callable] = None, log_problems: bool = True):
        if image_mode not in ("pixels", "paths"):
            raise ValueError(f"image_mode must be 'pixels' or 'paths', not {image_mode!r}")
        if image_mode == "pixels" and preprocess is None:
            raise ValueError("image_mode='pixels' needs a preprocess callable")
        if max_turns is not None and max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, not {max_turns}")
        self.data_path = data_path
        self.images_dir = os.path.abspath(images_dir)
        self.tokenizer = tokenizer
        self.image_ids = list(image_ids)
        self.max_seq_len = max_seq_len
        self.max_turns = max_turns
        self.image_prefix = image_prefix
        self.max_images = max_images
        self.strict = strict
        self.image_mode = image_mode
        self.preprocess = preprocess
        self.log_problems = log_problems  # under torchrun only rank 0 logs; every rank counts

        self.problems: List[tuple] = []  # (record_ref, reason), one per bad record
        self._reported = set()
        self._shared = 0  # problems[:_shared] are known to every rank (see take_new_problems)
        self._file_sizes = {}  # one stat per file, even when many records share an image
        self.samples = []  # (ref, record id, messages, absolute image paths)
        self.n_read = 0
        for ref, record, error in read_records(data_path):
            self.n_read += 1
            if isinstance(record, dict) and "id" in record:
                ref += f" (id={record['id']!r})"  # repr: escapes any bad characters in the id
            try:
                if error:
                    raise _Bad(error)
                messages, paths = self._check(record)
            except _Bad as bad:
                self.report(ref, str(bad))
                continue
            self.samples.append((ref, record.get("id"), messages, paths))
        self._file_sizes = {}  # only needed while loading; don't ship it to every worker
        self._shared = len(self.problems)  # every rank finds the same load-time problems
        # Cheap length estimates for length-grouped batching: about one token per character
        # (true for Chinese, generous for English) plus the placeholder of every image.
        self.approx_lengths = [self._approx_length(s[2]) for s in self.samples]

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
        if self.log_problems:
            logger.warning("%s", message)

    def take_new_problems(self) -> List[tuple]:
        """Problems found since the last call, for sharing with the other ranks."""
        new, self._shared = self.problems[self._shared:], len(self.problems)
        return new

    def drop_images(self, bad: dict) -> None:
        """Drop (and report) every record that uses a picture of `bad` ({path: reason}): the
        feature cache decodes pictures itself, so paths mode learns of broken ones from it."""
        if not bad:
            return
        kept = []
        for sample in self.samples:
            reasons = [bad[p] for p in sample[3] if p in bad]
            if reasons:
                self.report(sample[0], reasons[0])
            else:
                kept.append(sample)
        self.samples = kept
        self.approx_lengths = [self._approx_length(s[2]) for s in kept]

    def summary(self) -> str:
        return summarize(self.problems, f"{self.data_path}: {self.n_read} record(s) read, "
                                        f"{len(self.samples)} passed the load-time checks")

    # ---- load-time checks -----------------------------------------------------------------

    @staticmethod
    def _turn(k: int, turn) -> dict:
        if not isinstance(turn, dict):
            raise _Bad(f"bad turn: turn {k} is not an object")
        role, text = ((turn.get("from"), turn.get("value")) if "from" in turn
                      else (turn.get("role"), turn.get("content")))
        if role not in ROLES:
            raise _Bad(f"bad turn: turn {k} has unknown role {role!r}")
        if not isinstance(text, str):
            raise _Bad(f"bad turn: turn {k} has no string value/content")
        return {"role": ROLES[role], "content": text}

    def _file_size(self, path: str) -> Optional[int]:
        if path not in self._file_sizes:
            self._file_sizes[path] = os.path.getsize(path) if os.path.isfile(path) else None
        return self._file_sizes[path]

    def _check(self, record):
        """Cheap checks of one record; return (messages, image paths) or raise _Bad."""
        if not isinstance(record, dict):
            raise _Bad("record is not a JSON object")
        if not _valid_unicode(record):
            raise _Bad("text is not valid UTF-8")
        for key in ("conversations", "image"):
            if key not in record:
                raise _Bad(f"missing field: {key!r}")
        turns, image = record["conversations"], record["image"]
        if not isinstance(turns, list):
            raise _Bad("wrong field type: 'conversations' must be a list")
        if not isinstance(image, str):
            raise _Bad("wrong field type: 'image' must be a string")
        if not turns:
            raise _Bad("empty conversation")
        messages = [self._turn(k, t) for k, t in enumerate(turns, 1)]
        roles = [m["role"] for m in messages]
        if "assistant" not in roles:
            raise _Bad("no assistant turn")
        for k, role in enumerate(roles):
            if role != ("user" if k % 2 == 0 else "assistant"):
                raise _Bad(f"turns do not alternate user/assistant: turn {k + 1} is {role}")
        if roles[-1] == "user":
            raise _Bad("conversation ends with an unanswered user turn")
        marks = 0
        for k, m in enumerate(messages, 1):
            if m["role"] == "user":
                marks += m["content"].count(IMAGE_MARK)
            elif not m["content"].strip():
                raise _Bad(f"empty answer: turn {k}")
            elif IMAGE_MARK in m["content"]:
                raise _Bad(f"{IMAGE_MARK} mark in an answer: turn {k}")
        names = [n.strip() for n in image.split(",")] if image.strip() else []
        if "" in names:
            raise _Bad(f"wrong field type: empty file name in 'image' ({image!r})")
        if marks != len(names):
            raise _Bad(f"image count mismatch: {marks} {IMAGE_MARK} mark(s) in user turns "
                       f"but {len(names)} image(s)")
        if self.max_images is not None and len(names) > self.max_images:
            raise _Bad(f"too many images: {len(names)} > max_images={self.max_images}")
        paths = [self._image_path(n) for n in names]
        for path in paths:
            size = self._file_size(path)
            if size is None:
                raise _Bad(f"image file missing: {path}")
            if size == 0:
                raise _Bad(f"image file is empty (0 bytes): {path}")
        return messages, paths

    def _image_path(self, name: str) -> str:
        """The file of picture `name`, which must lie inside the images folder: a dataset must
        not make training read files from elsewhere ("../../secret.png", "/etc/x.png")."""
        path = os.path.normpath(os.path.join(self.images_dir, self.image_prefix + name))
        if os.path.isabs(name) or not path.startswith(self.images_dir + os.sep):
            raise _Bad(f"image path outside the images folder: {name!r}")
        return path

    def _limit_turns(self, messages):
        return messages if self.max_turns is None else messages[: 2 * self.max_turns]

    def _approx_length(self, messages) -> int:
        messages = self._limit_turns(messages)
        marks = sum(m["content"].count(IMAGE_MARK) for m in messages)
        chars = sum(len(m["content"]) for m in messages) - marks * len(IMAGE_MARK)
        return chars + marks * len(self.image_ids) + TEMPLATE_TOKENS_PER_TURN * len(messages)

    # ---- items ----------------------------------------------------------------------------

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
        raise _Bad(f"longer than max_seq_len={self.max_seq_len}: "
                   f"the first turn pair alone has {len(ids)} tokens")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        ref, record_id, messages, paths = self.samples[index]
        try:
            kept, ids, mask = self._fit(self._limit_turns(messages))
            n_images = sum(m["content"].count(IMAGE_MARK) for m in kept if m["role"] == "user")
            # The model swaps placeholder spans for image features in order: they must match.
            found = count_placeholders(ids, self.image_ids)
            if found != n_images:
                raise _Bad(f"placeholder count mismatch: {found} span(s) in the ids "
                           f"for {n_images} image(s)")
            item = {"input_ids": torch.tensor(ids, dtype=torch.long),
                    "labels": torch.tensor([t if m else IGNORE_INDEX for t, m in zip(ids, mask)],
                                           dtype=torch.long),
                    "index": index, "id": record_id, "image_paths": paths[:n_images]}
            if self.image_mode == "pixels":
                item["pixel_values"] = self._pixels(item["image_paths"])
        except _Bad as bad:
            return Skipped(index, ref, str(bad))
        return item

    def _pixels(self, paths) -> Optional[torch.Tensor]:
        if not paths:
            return None
        try:
            images = [load_image(p) for p in paths]
        except ImageError as e:
            raise _Bad(f"image cannot be decoded: {e}") from None
        pixels = self.preprocess(images)
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or len(pixels) != len(paths):
            raise TypeError(f"preprocess must return a tensor [{len(paths)}, 3, H, W], "
                            f"got {getattr(pixels, 'shape', type(pixels))}")
        return pixels


def collate(batch, pad_id: int = 0) -> dict:
    """Pad a list of items (right padding, to the longest sample) into a batch.

    `Skipped` items are dropped and listed in "skipped" as (record_ref, reason) pairs. If every
    item was skipped the batch has B=0: input_ids/labels/attention_mask of shape [0, 0] and
    "pixel_values" None; the trainer should skip that step (check `input_ids.shape[0] == 0`).
    "pixel_values" concatenates the images of all samples in order ([N_total, 3, H, W]) and
    is None in paths mode or when no sample has an image; "images_per_sample" splits them.
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
    pixels = [x["pixel_values"] for x in items if x.get("pixel_values") is not None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_paths": [p for x in items for p in x["image_paths"]],
        "images_per_sample": torch.tensor([len(x["image_paths"]) for x in items], dtype=torch.long),
        "skipped": [(x.record_ref, x.reason) for x in batch if isinstance(x, Skipped)],
        "indices": [x["index"] for x in items],
        "ids": [x["id"] for x in items],
    }


def make_collate(pad_id: int = 0):
    """A picklable collate_fn (DataLoader workers may be spawned) with a fixed pad id."""
    return partial(collate, pad_id=pad_id)
