"""Answering questions about pictures: the one code path behind `3-eval_chat.py`, `web_server.py`
and the demo.

- `resolve_weights` turns `pretrain` / `sft` / `sft_multi`, a `.pth` path or an exported folder
  into a path, `load_model` builds the model from it (the size is read from the weights);
- pictures are opened with `model.vision.load_image` (one loader for training and chat);
- `stream_answer` yields the answer text piece by piece;
- `answer_batch` answers many `Request`s at once (left-padded batches, one `generate` call per
  batch), `iter_answers` the same as each batch is done; `answer` is its batch of one.

Greedy (temperature 0) answers do not depend on the batch size: tests/test_batched_eval.py checks
them token for token, and the demo's held-out answers are the same batched or one by one. (Padding
changes the shapes of the float sums, so an exact tie between two tokens could in principle
break the other way.) Sampled answers do depend on it: the rows of a batch share one random
stream, so a seeded run is reproducible at a given batch size but does not equal one by one.

Problems a user can fix (a missing file, a picture that is not one) raise `UserError`, whose
message is one line that names the path and what to do: front ends show it without a traceback.
"""
import ctypes
import itertools
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from .checkpoint import (CheckpointError, build_vlm, config_for, folder_config, is_weights_folder, load_weights,
                         read_state_dict)
from .config import DEFAULT_VISION_MODEL, DEMO_VISION_MODEL, REPO_ROOT, V1_VISION_MODEL, VLMConfig, size_tag
from .prompt import PICTURE_SLOT, clip_text, count_placeholders, encode_chat_prompt
from .vision import ImageError, load_image

DEFAULT_OUT_DIR = "out"
EVAL_IMAGES = os.path.join(REPO_ROOT, "dataset", "eval_images")
EVAL_MULTI_IMAGES = os.path.join(REPO_ROOT, "dataset", "eval_multi_images", "bird")
DEFAULT_QUESTION = "这个图片描述的是什么内容？"
EVAL_MULTI_QUESTION = "Name all the differences between these two birds."   # v1's, about EVAL_MULTI_IMAGES
WEIGHT_NAMES = ("pretrain", "sft", "sft_multi", "sft_video")   # sft_video: the demo's video stage
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WEIGHTS_HINT = ("train them (1-pretrain_vlm.py, then 2-sft_vlm.py), put the published weights "
                "there, or run `python demo.py` for a small demo model (written to out/demo/)")
log = logging.getLogger("minimind_v")


class UserError(Exception):
    """A problem with the user's input; its message is one self-explaining line."""


# glibc's mallopt parameters (malloc.h) and the values reuse_freed_memory sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20      # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: 2 GiB, i.e. never in practice


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep the memory of freed tensors for reuse, for this process.

    By default glibc hands a freed block of 128 KiB or more (the bar rises with use) straight
    back to the system, and trims the free top of its heap once it passes twice that bar. Batched
    answering allocates and frees blocks of megabytes in every layer, and the kernel then zeroes
    every page again on its first touch: about 14,000 page faults in one `generate` of 64 demo
    answers. Serving blocks under 32 MiB from a heap that is never trimmed took 6-9% off batch
    64 and 10% off the vision encoder over 74 pictures, and changed nothing one by one or in
    training (docs/batched_eval.md), so 3-eval_chat.py and demo.py's evaluation call this. The
    cost: the process keeps its peak memory instead of returning it between batches.

    Left alone when the user already tunes malloc through the environment, and where there is no
    glibc (macOS, musl). Returns whether the settings were applied."""
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or \
            "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@dataclass
class Sampling:
    """Decoding settings; the defaults are v1's 3-eval_chat.py (temperature 0.5, the 8 likeliest tokens)."""
    temperature: float = 0.5
    top_k: int = 8              # 0: off
    top_p: float = 1.0          # 1: off
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    stop_at_eos: bool = True    # False: always max_new_tokens tokens (benchmarks compare equal lengths)


# -- which weights ------------------------------------------------------------------------------
def weight_path(name: str, out_dir: str = DEFAULT_OUT_DIR, tag: str = size_tag(512)) -> str:
    """`sft` -> `out/512_vlm_sft.pth` (the original file names); anything else is a path."""
    return os.path.join(out_dir, f"{tag}_vlm_{name}.pth") if name in WEIGHT_NAMES else name


def resolve_weights(name: str, out_dir: str = DEFAULT_OUT_DIR, tag: str = size_tag(512)) -> str:
    path = weight_path(name, out_dir, tag)
    if os.path.isdir(path):
        if not is_weights_folder(path):
            raise UserError(f"{path} is not a MiniMind-V weights folder (a published v1 folder or one written "
                            f"by scripts/export_model.py): its config.json is missing or not MiniMind's")
        return path
    if not os.path.isfile(path):
        hint = ("train them with `2-sft_vlm.py --multi`, or ask the SFT model with "
                "--weight sft" if name == "sft_multi" else WEIGHTS_HINT)
        raise UserError(f"weights not found: {path}; {hint}")
    return path


def find_checkpoints(out_dir: str = DEFAULT_OUT_DIR) -> List[str]:
    """VLM weight files (`*_vlm_*.pth`) and exported folders in `out_dir` and its subfolders
    (the demo writes to out/demo/), SFT ones first."""
    found = []

    def scan(folder, depth):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".pth") and "_vlm_" in name and os.path.isfile(path):
                found.append(path)
            elif is_weights_folder(path):
                found.append(path)
            elif depth == 0 and os.path.isdir(path):
                scan(path, 1)

    if os.path.isdir(out_dir):
        scan(out_dir, 0)
    return sorted(found, key=lambda p: "_vlm_sft" not in os.path.basename(p))   # stable sort


# -- loading ------------------------------------------------------------------------------------
def is_export(path: str) -> bool:
    """A folder written by scripts/export_model.py (it records its CLIP folder)."""
    return (folder_config(path) or {}).get("model_type") == VLMConfig.model_type


def clip_width(folder: str) -> Optional[int]:
    """Hidden size of the CLIP vision tower saved in `folder`, or None if there is none."""
    from transformers import CLIPVisionConfig

    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    try:   # reads a full CLIP's vision_config as well as a vision-only config
        return CLIPVisionConfig.from_pretrained(folder, local_files_only=True).hidden_size
    except (OSError, ValueError):
        return None


def choose_vision_model(width: int, recorded: Optional[str] = None) -> str:
    """The first known CLIP folder whose width fits the projector: the weights tell which encoder
    they were trained with (768: CLIP ViT-B/32; the demo encoder is narrower)."""
    candidates = [p for p in (recorded, DEFAULT_VISION_MODEL, V1_VISION_MODEL, DEMO_VISION_MODEL) if p]
    for path in candidates:
        if clip_width(path) == width:
            return path
    return candidates[0]   # loading it fails with a message that says how to get it


def load_model(weights: str, vision_model_path: Optional[str] = None, device: str = "cpu", compile: bool = False):
    """A MiniMindVLM in eval mode, with its vision tower, from a `.pth` file or an exported folder.

    Without `vision_model_path` the vision model is the one an export recorded, else the first
    of the default and demo CLIP folders whose width fits the weights. On CUDA the decoding step
    is replayed as a CUDA graph (`MiniMindLM.compile_decoding`): free to set up, and several
    times eager's tokens/s (docs/gpu.md). `compile`: decoding steps also go through
    torch.compile; off by default because compiling takes seconds that a short chat never earns
    back (README: Speed).
    """
    try:
        sd = read_state_dict(weights)
        config = config_for(weights, sd)
        recorded = config.vision_model_path if is_export(weights) else None
        vision = vision_model_path or choose_vision_model(config.vision_hidden_size, recorded)
        model = build_vlm(config=config, vision_model_path=vision)
        kind = load_weights(model, sd, name=weights)
    except (FileNotFoundError, CheckpointError, ValueError, OSError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    if kind == "llm":
        log.warning("%s holds no vision projector (LLM-only weights): pictures go through an "
                    "untrained projector", weights)
    try:
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as e:   # e.g. cuda asked for on a CPU-only torch
        raise UserError(f"cannot use device {device!r}: {str(e).splitlines()[0]}") from None
    return model.compile_decoding(compile=compile, cuda_graph=True)   # the graph is used on CUDA only


def count_parameters(model) -> int:
    """Parameters of the decoder and projector (the frozen CLIP is not a submodule)."""
    return sum(p.numel() for p in model.parameters())


# -- pictures -----------------------------------------------------------------------------------
def list_files(paths: Iterable[str], extensions: Tuple[str, ...] = IMAGE_EXTENSIONS) -> List[str]:
    """Files as given, folders expanded to the files in them with these extensions (pictures by
    default), sorted by name."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            out += [os.path.join(path, n) for n in sorted(os.listdir(path))
                    if n.lower().endswith(extensions) and not n.startswith(".")]
        else:
            out.append(path)
    return out


# -- prompting and decoding ---------------------------------------------------------------------
def check_text(text: str):
    """Text read from bytes that are not UTF-8 holds lone surrogates, which the tokenizer cannot
    take (it raises a TypeError): say so in one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the question is not UTF-8 text (saved in another encoding, e.g. GBK?); "
                        "convert it to UTF-8 and ask again") from None


def build_prompt_ids(tokenizer, question: str, n_images: int, history: Sequence[dict] = (),
                     image_ids: Sequence[int] = None, max_tokens: Optional[int] = None,
                     clip: bool = False) -> List[int]:
    """Ids of `history` (alternating user/assistant messages) + `question`, ready to answer.

    The pictures belong to the conversation, so their marks (one per picture, as in the original)
    go at the start of the first user turn that is kept; with `clip` the pictures are the
    keyframes of one clip and are introduced as such (model/prompt.clip_text, as in training).
    `<image>` typed in a question is plain text: pictures come with the request, not from what
    the user types. When the prompt exceeds `max_tokens`, the oldest exchanges are dropped.
    """
    image_ids = image_ids if image_ids is not None else VLMConfig().image_ids
    turns = list(history)
    for text in [question] + [m["content"] for m in turns]:
        check_text(text)
    while True:
        messages = turns + [{"role": "user", "content": question}]
        marks = clip_text(n_images, PICTURE_SLOT) if clip and n_images else f"{PICTURE_SLOT}\n" * n_images
        messages[0] = dict(messages[0], content=marks + messages[0]["content"])
        ids = encode_chat_prompt(tokenizer, messages, image_ids, mark=PICTURE_SLOT)
        if count_placeholders(ids, image_ids) != n_images:
            raise UserError("the conversation spells out the picture placeholder (25 '<' then 25 '>') "
                            "as text; remove it and ask again")
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
        if not turns:
            raise UserError(f"the question is too long: {len(ids)} prompt tokens, at most "
                            f"{max_tokens} fit before the answer")
        turns = turns[2:]


def decode_stream(tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    """Text pieces of a token stream. A Chinese character can span several byte-level tokens:
    a piece is only released once it no longer ends in a half character (U+FFFD)."""
    ids: List[int] = []
    shown = ""
    for token in token_ids:
        ids.append(int(token))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
        shown = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(shown):
        yield text[len(shown):]


def prompt_budget(model, sampling: Sampling) -> int:
    """How many prompt tokens fit before an answer of sampling.max_new_tokens."""
    budget = model.config.max_seq_len - sampling.max_new_tokens
    if budget < 1:   # say which setting is wrong, not "the question is too long ... at most -91808 fit"
        raise UserError(f"max_new_tokens={sampling.max_new_tokens} leaves no room for the question: this "
                        f"model reads at most {model.config.max_seq_len} tokens, question and answer together")
    return budget


def generate_args(tokenizer, sampling: Sampling) -> dict:
    return dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
                eos_token_id=tokenizer.eos_token_id if sampling.stop_at_eos else -1)   # -1: never sampled


def stream_answer(model, tokenizer, images: Sequence[Image.Image], question: str,
                  history: Sequence[dict] = (), sampling: Optional[Sampling] = None,
                  clip: bool = False) -> Iterator[str]:
    """Stream the model's answer to `question` about `images` (may be empty; with `clip`, the
    keyframes of one clip), after `history`."""
    sampling = sampling or Sampling()
    device = model.tok_embeddings.weight.device
    ids = build_prompt_ids(tokenizer, question, len(images), history, model.config.image_ids,
                           prompt_budget(model, sampling), clip)
    pixel_values = model.vision_encoder.preprocess(list(images)) if images else None
    steps = model.generate(torch.tensor([ids], device=device), pixel_values=pixel_values,
                           stream=True, **generate_args(tokenizer, sampling))
    yield from decode_stream(tokenizer, (step[0, 0].item() for step in steps))


def answer(model, tokenizer, images: Sequence[Image.Image], question: str,
           history: Sequence[dict] = (), sampling: Optional[Sampling] = None, clip: bool = False) -> str:
    """The whole answer at once: the batch of one of `answer_batch`. UserError if it cannot be given."""
    request = Request(question, images, history, clip)
    return answer_batch(model, tokenizer, [request], sampling, batch_size=1)[0].text_or_raise()


# -- many questions at once ---------------------------------------------------------------------
Picture = Union[Image.Image, str, bytes]   # an open picture, or a file path / encoded bytes to open
PAD_ID = 0                                 # what left padding holds (masked out, so any id would do)


@dataclass
class Request:
    """A question about `images` after `history`. Pictures given as paths or bytes are opened only
    when the request's batch runs, so a long list of requests does not hold every picture."""
    question: str
    images: Sequence[Picture] = ()
    history: Sequence[dict] = ()
    clip: bool = False        # the images are the keyframes of one clip (model/video.read_keyframes)


@dataclass
class Result:
    """The answer to one Request, or why there is none (`error`, one line: a picture that cannot be
    read, a prompt too long, ...). One bad request never sinks the others of its batch."""
    text: Optional[str] = None
    error: Optional[str] = None

    def text_or_raise(self) -> str:
        if self.error is not None:
            raise UserError(self.error)
        return self.text


def answer_batch(model, tokenizer, requests: Sequence[Request], sampling: Optional[Sampling] = None,
                 batch_size: int = 16) -> List[Result]:
    """A Result for every request, in the order given, answered `batch_size` at a time.

    All the requests are sorted by prompt length first, so that the rows of a batch are of
    similar length and little compute goes into padding."""
    results: List[Optional[Result]] = [None] * len(requests)
    for index, result in iter_answers(model, tokenizer, requests, sampling, batch_size, window=None):
        results[index] = result
    return results


def iter_answers(model, tokenizer, requests: Iterable[Request], sampling: Optional[Sampling] = None,
                 batch_size: int = 16, window: Optional[int] = 8) -> Iterator[Tuple[int, Result]]:
    """(index in `requests`, Result) for every request, a batch at a time, as soon as each batch is done.

    Requests are read `window` batches at a time (None: all of them) and sorted by prompt length
    within that group: results come in that order, not the order given. A bounded window lets a
    caller print the first answers before the last requests are even read.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    sampling = sampling or Sampling()
    budget = prompt_budget(model, sampling)
    numbered = enumerate(requests)
    while True:
        group = list(itertools.islice(numbered, window * batch_size if window else None))
        if not group:
            return
        prompts = []
        for index, request in group:
            try:
                ids = build_prompt_ids(tokenizer, request.question, len(request.images), request.history,
                                       model.config.image_ids, budget, request.clip)
            except UserError as e:
                yield index, Result(error=str(e))
                continue
            prompts.append((index, request, ids))
        prompts.sort(key=lambda p: len(p[2]))   # stable: prompts of equal length keep their order
        for start in range(0, len(prompts), batch_size):
            yield from _answer_rows(model, tokenizer, prompts[start:start + batch_size], sampling)


def pad_left(prompts: Sequence[List[int]], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (input_ids, attention_mask) [B, longest]. Left padding: every row's last prompt
    token sits in the last column, where generation continues; the mask keeps the padding out of
    attention."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[PAD_ID] * (width - len(ids)) + ids for ids in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    return input_ids, mask


def open_picture(picture: Picture) -> Image.Image:
    return picture if isinstance(picture, Image.Image) else load_image(picture)


def _answer_rows(model, tokenizer, rows, sampling: Sampling) -> Iterator[Tuple[int, Result]]:
    """Answer one batch, `rows` = [(index, request, prompt ids)], with one generate call."""
    ready, images = [], []
    for index, request, ids in rows:
        try:
            opened = [open_picture(p) for p in request.images]
        except ImageError as e:
            yield index, Result(error=str(e))
            continue
        ready.append((index, ids))
        images += opened            # in row order, as the rows' placeholders come in the batch
    if not ready:
        return
    input_ids, mask = pad_left([ids for _, ids in ready], model.tok_embeddings.weight.device)
    pixel_values = model.vision_encoder.preprocess(images) if images else None
    args = generate_args(tokenizer, sampling)
    tokens = model.generate(input_ids, attention_mask=mask, pixel_values=pixel_values, stream=False, **args)
    for (index, _), row in zip(ready, tokens.tolist()):
        if args["eos_token_id"] in row:          # rows that finished early are padded with eos
            row = row[:row.index(args["eos_token_id"])]
        yield index, Result(text=tokenizer.decode(row, skip_special_tokens=True))
