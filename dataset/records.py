"""What a training record is, where records come from, and when one is bad.

Sources differ only in how a record is stored:
- `JsonRecords`: a JSON list or JSONL file plus an images folder (the original v1 layout);
- `ParquetRecords` (dataset/parquet.py): Parquet files with the pictures inside (the official
  layout since 2025-12, and Hub-style LLaVA files).
Each gives a `RawRecord` per index: the turns as the file holds them and the pictures the
turns' `<image>` marks refer to, in order (file paths or encoded bytes). `conversation` checks
the turns the same way for every source; the dataset (vlm_dataset.py) does the rest.

Sources keep only a compact index in memory (byte offsets, row groups, one length estimate per
record), never the records themselves, so a dataset of millions of rows stays small in every
process and every DataLoader worker.
"""
import itertools
import json
import mmap
import os
import re
from typing import Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from model.config import IMAGE_MARK, IMAGE_PLACEHOLDER_IDS
from model.prompt import DEFAULT_FRAMES, VIDEO_MARK, clip_text

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TEMPLATE_TOKENS_PER_TURN = 8   # rough cost of "<s>user\n ... </s>\n" in approx_lengths


class BadRecord(Exception):
    """A problem with one record; the message is the reason, "kind" or "kind: detail"."""


class Frame(NamedTuple):
    """Keyframe `index` of the `count` evenly spaced keyframes of a clip (model/video.py)."""
    video: Union[str, bytes]           # the clip's file path or its bytes
    index: int
    count: int


class RawRecord(NamedTuple):
    record_id: object                  # the record's "id" if it has one, else None
    turns: list                        # [{"from", "value"}] or [{"role", "content"}], as stored
    pictures: List[Union[str, bytes, Frame]]  # paths, picture bytes or clip frames, one per <image> mark


def expand_clip(turns: list, video, n_frames: int) -> Tuple[list, List[Frame]]:
    """A clip record's turns with its one `<video>` mark replaced by clip_text (a picture mark
    per keyframe), and those keyframes as pictures."""
    if not isinstance(n_frames, int) or isinstance(n_frames, bool) or n_frames < 1:
        raise BadRecord(f"wrong field type: 'frames' must be a positive whole number, not {n_frames!r}")
    texts = [t.get("value", t.get("content")) if isinstance(t, dict) else None for t in turns]
    marks = sum(text.count(VIDEO_MARK) for text in texts if isinstance(text, str))
    if marks != 1:
        raise BadRecord(f"video mark count mismatch: a clip needs exactly one {VIDEO_MARK} mark, found {marks}")
    expanded = []
    for turn, text in zip(turns, texts):
        if isinstance(text, str) and VIDEO_MARK in text:
            key = "value" if "value" in turn else "content"
            turn = {**turn, key: text.replace(VIDEO_MARK, clip_text(n_frames).rstrip("\n"))}
        expanded.append(turn)
    return expanded, [Frame(video, k, n_frames) for k in range(n_frames)]


# ---------------------------------------------------------------------------- checks
def valid_unicode(obj) -> bool:
    """False if any string holds a lone surrogate: a byte that was not UTF-8 (decoded with
    surrogateescape) or a "\\udXXX" escape. Either would break tokenization later."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(obj, dict):
        return all(valid_unicode(k) and valid_unicode(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(valid_unicode(v) for v in obj)
    return True


def _turn(k: int, turn) -> dict:
    if not isinstance(turn, dict):
        raise BadRecord(f"bad turn: turn {k} is not an object")
    role, text = ((turn.get("from"), turn.get("value")) if "from" in turn
                  else (turn.get("role"), turn.get("content")))
    if role not in ROLES:
        raise BadRecord(f"bad turn: turn {k} has unknown role {role!r}")
    if not isinstance(text, str):
        raise BadRecord(f"bad turn: turn {k} has no string value/content")
    return {"role": ROLES[role], "content": text}


def conversation(turns, n_pictures: int, max_images: Optional[int] = None, unanswered: bool = False) -> List[dict]:
    """Stored turns -> [{"role": "user"|"assistant", "content"}], or BadRecord saying why not:
    turns must alternate user/assistant and end with an answer, answers must not be empty or
    hold `<image>`, and the user turns' marks must match the pictures. unanswered=True also
    takes a last user turn without its answer (a question file's question-only record)."""
    if not isinstance(turns, list):
        raise BadRecord("wrong field type: 'conversations' must be a list")
    if not turns:
        raise BadRecord("empty conversation")
    messages = [_turn(k, t) for k, t in enumerate(turns, 1)]
    roles = [m["role"] for m in messages]
    if unanswered and roles[-1] == "user":
        roles.append("assistant")   # checked as if answered; returned as it is
    if "assistant" not in roles:
        raise BadRecord("no assistant turn")
    for k, role in enumerate(roles):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise BadRecord(f"turns do not alternate user/assistant: turn {k + 1} is {role}")
    if roles[-1] == "user":
        raise BadRecord("conversation ends with an unanswered user turn")
    marks = 0
    for k, m in enumerate(messages, 1):
        if m["role"] == "user":
            marks += m["content"].count(IMAGE_MARK)
        elif not m["content"].strip():
            raise BadRecord(f"empty answer: turn {k}")
        elif IMAGE_MARK in m["content"]:
            raise BadRecord(f"{IMAGE_MARK} mark in an answer: turn {k}")
    if marks != n_pictures:
        raise BadRecord(f"image count mismatch: {marks} {IMAGE_MARK} mark(s) in user turns "
                        f"but {n_pictures} image(s)")
    if max_images is not None and n_pictures > max_images:
        raise BadRecord(f"too many images: {n_pictures} > max_images={max_images}")
    return messages


def approx_length(messages) -> int:
    """A cheap token-length estimate: about one token per character (true for Chinese,
    generous for English) plus the placeholder of every picture and the template per turn."""
    marks = sum(m["content"].count(IMAGE_MARK) for m in messages)
    chars = sum(len(m["content"]) for m in messages) - marks * len(IMAGE_MARK)
    return chars + marks * len(IMAGE_PLACEHOLDER_IDS) + TEMPLATE_TOKENS_PER_TURN * len(messages)


# ---------------------------------------------------------------------------- JSON / JSONL
# Files users hand over by mistake for a JSON/JSONL one, by their first bytes.
NOT_JSON = [(b"PK\x03\x04", "a zip archive", ": unpack it and give the file inside"),
            (b"\x1f\x8b", "gzip-compressed", ": unpack it first"),
            (b"\x89PNG", "a PNG picture", ""), (b"\xff\xd8\xff", "a JPEG picture", "")]


def check_json_text(path: str, head: bytes):
    """ValueError naming what `path` is when its first bytes show it is not JSON text, instead
    of one 'not valid UTF-8' or 'malformed JSON' problem for each of its lines."""
    for magic, kind, advice in NOT_JSON:
        if head.startswith(magic):
            raise ValueError(f"{path} is {kind}, not JSON/JSONL records{advice}")
    if b"\0" in head:
        raise ValueError(f"{path} holds NUL bytes: not UTF-8 JSON/JSONL text (a binary file, or UTF-16 text?)")


class RawLine(NamedTuple):
    """One record of a JSON-list or JSONL file, as `read_json_lines` finds it."""
    number: int               # the line number (JSONL) or the index in the list (JSON list)
    offset: int               # where its bytes start in the file
    size: int                 # how many bytes it takes
    record: object            # the parsed record (None when it could not be parsed)
    error: Optional[str]      # why it could not be parsed


# A JSON string (skipped whole: its brackets and commas are text) or a bracket or comma:
# enough to find where each element of a JSON list starts and ends without parsing it.
_JSON_LIST_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


def is_json_list(path: str) -> bool:
    """Does the file hold a JSON list (first non-blank byte "[", after any UTF-8 BOM), not JSONL?"""
    with open(path, "rb") as f:
        if f.read(3) != b"\xef\xbb\xbf":
            f.seek(0)
        while True:   # in blocks, not lines: a JSON list is often one line of the whole file
            block = f.read(1 << 16)
            if not block or block.strip():
                return block.lstrip().startswith(b"[")


def read_json_lines(path: str) -> Iterator[RawLine]:
    """Every record of a JSON-list or JSONL file, in order, with where its bytes lie, so that it
    can be read again alone. A JSON list is streamed too (memory-mapped, never loaded whole); one
    cut off or with text after its end cannot be split into records: ValueError."""
    with open(path, "rb") as f:
        check_json_text(path, f.read(4096))
        f.seek(0)
        if is_json_list(path):
            yield from _json_list_elements(path, f)
            return
        offset = 0
        for n, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if raw.strip():
                yield RawLine(n, start, len(raw), *_parse_line(raw))


def _json_list_elements(path: str, f) -> Iterator[RawLine]:
    """The elements of the JSON list in file `f`, found by their brackets and commas, each parsed
    alone: one that does not parse is one bad record, not a file that cannot be read."""
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        depth, start, number = 0, None, 0
        for token in _JSON_LIST_TOKEN.finditer(data):
            char = token.group()
            if len(char) > 1:   # a string
                continue
            at = token.start()
            depth += 1 if char in b"[{" else -1 if char in b"]}" else 0
            if depth == 1 and char in b"[{":   # the list opens
                start = at + 1
            elif depth == 0 or (depth == 1 and char == b","):   # an element ends
                raw = data[start:at]
                if raw.strip() or char == b"," or number:   # "[]" holds none; "[1,]" an empty one
                    yield RawLine(number, start, len(raw), *(_parse_line(raw) if raw.strip() else
                                                             (None, "malformed JSON: an empty record")))
                    number += 1
                start = at + 1
                if depth == 0:
                    if data[start:].strip():
                        raise ValueError(f"{path}: not a valid JSON list (text after its closing bracket)")
                    return
        raise ValueError(f"{path}: not a valid JSON list (the file ends inside record [{number}]: cut off?)")


def json_ref(path: str, number: int, in_list: bool, record=None) -> str:
    """"<path> line N" (JSONL) or "<path> record [i]" (JSON list), with the record's id."""
    ref = f"{path} record [{number}]" if in_list else f"{path} line {number}"
    if isinstance(record, dict) and "id" in record:
        ref += f" (id={record['id']!r})"   # repr: escapes any bad characters in the id
    return ref


def read_records(path: str):
    """Yield (ref, record, error) for every record of a JSON-list or JSONL file."""
    in_list = is_json_list(path)
    for line in read_json_lines(path):
        yield json_ref(path, line.number, in_list, line.record), line.record, line.error


def _parse_line(raw: bytes):
    """(record, None) or (None, reason) for one JSONL line or JSON-list element. Bytes that are
    not UTF-8 survive as lone surrogates: the record, id and all, is then refused by the checks
    (`valid_unicode`), in the line that names it."""
    try:
        return json.loads(raw.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")), None
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} at column {e.colno}"


# v1's SFT records name "000000123456.jpg" where its folder holds "COCO_train2014_000000123456.jpg"
# (v1's SFT dataset added the prefix in code).
V1_SFT_IMAGE_PREFIX = "COCO_train2014_"
IMAGE_PREFIX_HELP = (f"put before every picture file name of JSON data (default: {V1_SFT_IMAGE_PREFIX} where "
                     "the folder's files carry it, as v1's SFT pictures do, else none)")


RECORDS_TO_GUESS_FROM = 100


def guess_image_prefix(records, images_dir: str) -> str:
    """V1_SFT_IMAGE_PREFIX when the first picture that `records` (a file's first records) name is
    missing from `images_dir` but is there under that prefix (v1's SFT data as downloaded), else ""."""
    for record in records:
        value = record.get("image") if isinstance(record, dict) else None
        if isinstance(value, str) and value.split(",")[0].strip():
            name = value.split(",")[0].strip()
            missing = not os.path.isfile(os.path.join(images_dir, name))
            prefixed = os.path.isfile(os.path.join(images_dir, V1_SFT_IMAGE_PREFIX + name))
            return V1_SFT_IMAGE_PREFIX if missing and prefixed else ""
    return ""


class JsonRecords:
    """Records of a JSON list or JSONL file whose pictures (and clips) are files in `images_dir`.

    A record names its pictures in "image" ("a.jpg, b.jpg"), or a clip in "video" ("clip.mp4",
    optionally "frames": N, else `frames`), whose one `<video>` mark becomes N keyframes. A file's
    name is `image_prefix` + the name; None: v1's SFT prefix where the folder's files carry it
    (see guess_image_prefix; `prefix_note` then says so, for the caller to tell the user), else none.

    Built in one pass that runs the cheap checks (JSON, UTF-8, fields, turns, mark/picture
    counts, picture files inside the folder, present and not empty): bad records are listed in
    `load_problems` and left out. Only where each good record's bytes lie is kept, and they are
    read again when needed: memory does not grow with the records' text, in JSONL and JSON lists
    alike (v1's files were JSON lists of 230K-600K records).
    """

    def __init__(self, path: str, images_dir: str, image_prefix: Optional[str] = None,
                 max_images: Optional[int] = None, frames: int = DEFAULT_FRAMES, unanswered: bool = False):
        self.path, self.max_images, self.frames = path, max_images, frames
        self.unanswered = unanswered   # question-only records are good (see `conversation`)
        self.images_dir = os.path.abspath(images_dir)
        self.prefix_note = None
        self.in_list = is_json_list(path)
        parsed = read_json_lines(path)
        # The first records are read once, for the guess and then with the rest.
        head = list(itertools.islice(parsed, RECORDS_TO_GUESS_FROM)) if image_prefix is None else []
        if image_prefix is None:
            image_prefix = guess_image_prefix((line.record for line in head), self.images_dir)
            if image_prefix:
                self.prefix_note = (f"{path}: its pictures are {image_prefix}<name> in {images_dir} (v1's SFT "
                                    f"data): read with that prefix (--image_prefix sets another, '' none)")
        self.image_prefix = image_prefix
        self.load_problems: List[Tuple[str, str]] = []
        self.n_read = 0
        spans, lengths = [], []   # (number, offset, size) of each good record
        sizes = {}   # one stat per picture file, even when many records share it
        for line in itertools.chain(head, parsed):
            self.n_read += 1
            try:
                if line.error:
                    raise BadRecord(line.error)
                turns, pictures = self._check(line.record, sizes)
            except BadRecord as bad:
                self.load_problems.append((json_ref(path, line.number, self.in_list, line.record), str(bad)))
                continue
            lengths.append(approx_length(conversation(turns, len(pictures), unanswered=self.unanswered)))
            spans.append((line.number, line.offset, line.size))
        self._spans = np.array(spans, dtype=np.int64).reshape(-1, 3)
        self.approx_lengths = np.array(lengths, dtype=np.int32)

    def __len__(self) -> int:
        return len(self._spans)

    def _raw(self, i: int):
        number, offset, size = (int(v) for v in self._spans[i])
        with open(self.path, "rb") as f:
            f.seek(offset)
            record, _ = _parse_line(f.read(size))
        return json_ref(self.path, number, self.in_list, record), record

    def ref(self, i: int) -> str:
        return self._raw(i)[0]

    def read(self, i: int, with_pictures: bool = True) -> RawRecord:
        _, record = self._raw(i)
        turns, paths = self._check(record)
        return RawRecord(record.get("id"), turns, paths if with_pictures else [])

    def iter_pictures(self, start: int = 0, stop: Optional[int] = None, step: int = 1) -> Iterator[tuple]:
        """(index, picture paths) of records start, start + step, ...; [] for one that has gone bad."""
        for i in range(start, len(self) if stop is None else min(stop, len(self)), step):
            try:
                yield i, self.read(i).pictures
            except BadRecord:
                yield i, []

    # ---- checks ---------------------------------------------------------------------------
    def _check(self, record, sizes=None):
        """(turns, pictures) of a record, or BadRecord; `sizes` given, its files are checked too."""
        if not isinstance(record, dict):
            raise BadRecord("record is not a JSON object")
        if not valid_unicode(record):
            raise BadRecord("text is not valid UTF-8")
        field = "video" if "video" in record else "image"
        for key in ("conversations", field):
            if key not in record:
                raise BadRecord(f"missing field: {key!r}")
        value, turns = record[field], record["conversations"]
        if not isinstance(value, str):
            raise BadRecord(f"wrong field type: {field!r} must be a string")
        names = [n.strip() for n in value.split(",")] if value.strip() else []
        if "" in names or (field == "video" and len(names) != 1):
            raise BadRecord(f"wrong field type: {field!r} must name {'one clip' if field == 'video' else 'files'} "
                            f"({value!r})")
        paths = [self._picture_path(n) for n in names]
        pictures = paths
        if field == "video":
            if not isinstance(turns, list):
                raise BadRecord("wrong field type: 'conversations' must be a list")
            turns, pictures = expand_clip(turns, paths[0], record.get("frames", self.frames))
        conversation(turns, len(pictures), self.max_images, self.unanswered)
        if sizes is not None:
            for path in paths:
                if path not in sizes:
                    sizes[path] = os.path.getsize(path) if os.path.isfile(path) else None
                if sizes[path] is None:
                    if not os.path.isdir(self.images_dir):   # one line, not a "missing" per record
                        raise FileNotFoundError(f"images folder {self.images_dir} not found: {self.path} "
                                                f"names its pictures as files in it")
                    raise BadRecord(f"image file missing: {path}")
                if sizes[path] == 0:
                    raise BadRecord(f"image file is empty (0 bytes): {path}")
        return turns, pictures

    def _picture_path(self, name: str) -> str:
        """The file of picture `name`, which must lie inside the images folder: a dataset must
        not make training read files from elsewhere ("../../secret.png", "/etc/x.png")."""
        path = os.path.normpath(os.path.join(self.images_dir, self.image_prefix + name))
        if os.path.isabs(name) or not path.startswith(self.images_dir + os.sep):
            raise BadRecord(f"image path outside the images folder: {name!r}")
        return path


def check_json_file(path: str):
    """FileNotFoundError saying why, unless `path` is a file (to be read as JSON/JSONL)."""
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a folder with no .parquet files: give a JSON/JSONL file, "
                                f"or a folder of Parquet shards")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} not found (see README: Using the real weights and data)")


def reads_as_parquet(data_path: str) -> bool:
    """Is `data_path` Parquet data that is there (a missing "x.parquet" is reported as missing by
    check_json_file)?"""
    import glob

    from dataset.parquet import is_parquet

    return is_parquet(data_path) and (glob.has_magic(data_path) or os.path.exists(data_path))


def check_data_path(data_path: str):
    """FileNotFoundError saying why, unless `data_path` names data that is there; reads nothing."""
    from dataset.parquet import parquet_files

    if reads_as_parquet(data_path):
        parquet_files(data_path)   # a folder or pattern with no shards
    else:
        check_json_file(data_path)


def open_records(data_path: str, images_dir: Optional[str] = None, image_prefix: Optional[str] = None,
                 max_images: Optional[int] = None, frames: int = DEFAULT_FRAMES, unanswered: bool = False):
    """The source for `data_path`: Parquet (a file, a folder of shards or a glob) or JSON/JSONL.
    `frames`: the keyframes of a clip whose record does not say. `unanswered`: JSON records may
    end with a question (Parquet rows are checked only when read, by the reader)."""
    from dataset.parquet import ParquetRecords

    if reads_as_parquet(data_path):
        return ParquetRecords(data_path, frames=frames)
    check_json_file(data_path)   # also the one "not found" for a missing .parquet file
    if images_dir is None:
        raise ValueError(f"{data_path} names its pictures by file: give the images folder (--images_path)")
    return JsonRecords(data_path, images_dir, image_prefix, max_images, frames, unanswered)
