"""Turning chat messages with `<image>` marks into token ids.

The one rule that matters: the image placeholder is inserted at the *token-id* level. Writing
the 50-character placeholder into the text and tokenizing it lets BPE merge a leading space
with the first `<` (`" <"` is its own token), and the image silently vanishes from the prompt.
"""
import os
from typing import List, Sequence, Tuple

from .config import IMAGE_MARK

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minimind_tokenizer")


def load_tokenizer(path: str = TOKENIZER_DIR):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(path)


# Where a record's clip goes; it becomes its keyframes, one picture each (see clip_text).
VIDEO_MARK = "<video>"
# Keyframes taken from a clip when neither the record nor the user says how many: as many as
# the SFT stage's pictures per sample.
DEFAULT_FRAMES = 4


def clip_text(n_frames: int, mark: str = IMAGE_MARK) -> str:
    """What a clip becomes in a prompt: a line saying the pictures are frames of one clip, in
    order, then one picture mark per frame. Training data and chat share it, so the model
    always sees clips the same way."""
    return f"以下是一段视频按时间顺序的{n_frames}帧：\n" + f"{mark}\n" * n_frames


# Where chat front ends attach their pictures. A private-use character, so that `<image>` typed by
# a user is just text (tokenized like any other) and cannot ask for a picture that is not there.
PICTURE_SLOT = "\ue000"


def encode_text(tokenizer, text: str, image_ids: Sequence[int], mark: str = IMAGE_MARK) -> List[int]:
    """Tokenize `text`, replacing every `mark` (datasets' `<image>`) with the placeholder ids."""
    pieces = text.split(mark)
    ids: List[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.extend(image_ids)
        if piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids


def render_chat(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode_chat_prompt(tokenizer, messages, image_ids: Sequence[int], mark: str = IMAGE_MARK) -> List[int]:
    """Ids of a conversation that ends with a user turn, ready for the model to answer."""
    return encode_text(tokenizer, render_chat(tokenizer, messages, True), image_ids, mark)


def encode_conversation(tokenizer, messages, image_ids: Sequence[int]) -> Tuple[List[int], List[int]]:
    """Ids of a whole conversation plus a 0/1 loss mask that is 1 on every assistant answer.

    Each message is rendered by the tokenizer's own chat template (as the difference between
    the rendering with and without it), so training text is exactly what inference sees. The
    mask covers an answer and its closing `</s>` (so the model learns to stop), not the
    newline the template adds after it.
    """
    eos = tokenizer.eos_token
    ids: List[int] = []
    mask: List[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        upto = render_chat(tokenizer, messages[: i + 1], False)
        segment = upto[len(rendered):]
        rendered = upto
        if message["role"] == "assistant":
            cut = segment.rfind(eos) + len(eos) if eos in segment else len(segment)
            answer = encode_text(tokenizer, segment[:cut], image_ids)
            tail = encode_text(tokenizer, segment[cut:], image_ids)
            ids += answer + tail
            mask += [1] * len(answer) + [0] * len(tail)
        else:
            seg_ids = encode_text(tokenizer, segment, image_ids)
            ids += seg_ids
            mask += [0] * len(seg_ids)
    return ids, mask


def count_placeholders(ids: Sequence[int], image_ids: Sequence[int]) -> int:
    """How many complete placeholder spans `ids` holds."""
    n, span, i, count = len(ids), len(image_ids), 0, 0
    first = image_ids[0]
    while i <= n - span:
        if ids[i] == first and list(ids[i:i + span]) == list(image_ids):
            count += 1
            i += span
        else:
            i += 1
    return count
