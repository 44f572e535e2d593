"""Ask MiniMind-V about pictures from the terminal.

    python 3-eval_chat.py                          # every picture in dataset/eval_images
    python 3-eval_chat.py --weight pretrain        # out/512_vlm_pretrain.pth
    python 3-eval_chat.py --multi                  # the two bird pictures as one question
    python 3-eval_chat.py --image my.jpg --interactive
    python 3-eval_chat.py --weight out/minimind-v-512-hf --json

Answers stream to stdout; problems with the input go to stderr as one line each.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from model.config import size_tag  # noqa: E402
from model.inference import (  # noqa: E402
    DEFAULT_OUT_DIR, DEFAULT_QUESTION, EVAL_IMAGES, EVAL_MULTI_IMAGES, Sampling, UserError, list_images,
    load_model, resolve_weights, stream_answer)
from model.prompt import load_tokenizer  # noqa: E402
from model.vision import ImageError, load_image  # noqa: E402


def number_in(kind, low, high=None, low_open=False):
    """An argparse type: a `kind` number in [low, high] ((low, high] with low_open)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low or (low_open and value == low) or (high is not None and value > high) or value != value:
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return value
    return parse


def parse_args(argv=None):
    d = Sampling()
    p = argparse.ArgumentParser(description="Chat with MiniMind-V about pictures.")
    p.add_argument("--weight", default="sft",
                   help="pretrain | sft | sft_multi (-> OUT_DIR/{dim}[_moe]_vlm_{weight}.pth), "
                        "a .pth file, or a folder written by scripts/export_model.py")
    p.add_argument("--out_dir", default=DEFAULT_OUT_DIR)
    p.add_argument("--dim", type=int, default=512, help="picks the file name with --weight NAME")
    p.add_argument("--use_moe", action="store_true", help="picks the *_moe_* file with --weight NAME")
    p.add_argument("--vision_model", default=None,
                   help="CLIP folder (default: the one an export recorded, else "
                        "model/vision_model/clip-vit-base-patch32, or demo-clip for demo weights)")
    p.add_argument("--image", nargs="+", default=None, help="picture files and/or folders "
                   "(default: dataset/eval_images, or the bird pictures with --multi)")
    p.add_argument("--prompt", default=DEFAULT_QUESTION)
    p.add_argument("--multi", action="store_true", help="ask about all the pictures at once")
    p.add_argument("--interactive", action="store_true",
                   help="multi-turn chat about the first picture (all of them with --multi); "
                        "questions come from stdin, an empty line or `exit` ends")
    p.add_argument("--temperature", type=number_in(float, 0), default=d.temperature, help="0 = greedy")
    p.add_argument("--top_k", type=number_in(int, 0), default=d.top_k, help="0 = off")
    p.add_argument("--top_p", type=number_in(float, 0, 1, low_open=True), default=d.top_p, help="in (0, 1]")
    p.add_argument("--repetition_penalty", type=number_in(float, 0, low_open=True), default=d.repetition_penalty,
                   help="> 0; 1 = off")
    p.add_argument("--max_new_tokens", type=number_in(int, 1), default=d.max_new_tokens)
    p.add_argument("--json", action="store_true", help="one JSON line per answer")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


def load_pictures(paths):
    """[(path, image)] for every readable picture; the others get one line on stderr."""
    pictures = []
    for path in list_images(paths):
        try:
            pictures.append((path, load_image(path, name=path)))
        except ImageError as e:
            print(f"skipped: {e}", file=sys.stderr)
    return pictures


def ask(model, tokenizer, pictures, question, history, sampling, as_json, header=True):
    """Stream one answer to stdout (or print it as a JSON line); returns the text."""
    images = [im for _, im in pictures]
    if header and not as_json:
        print(f"[{', '.join(os.path.basename(p) for p, _ in pictures)}] {question}", flush=True)
    pieces = []
    for piece in stream_answer(model, tokenizer, images, question, history, sampling):
        pieces.append(piece)
        if not as_json:
            print(piece, end="", flush=True)
    text = "".join(pieces)
    if as_json:
        image = [p for p, _ in pictures] if len(pictures) != 1 else pictures[0][0]
        print(json.dumps({"image": image, "prompt": question, "answer": text}, ensure_ascii=False),
              flush=True)
    else:
        print("\n", flush=True)
    return text


def interactive(model, tokenizer, pictures, sampling, as_json):
    history = []
    tty = sys.stdin.isatty()
    if tty:
        names = ", ".join(os.path.basename(p) for p, _ in pictures)
        print(f"Chatting about {names}; an empty line or `exit` ends.", file=sys.stderr)
    while True:
        try:
            question = input("> " if tty else "").strip()
        except EOFError:
            break
        if not question or question.lower() in ("exit", "quit"):
            break
        try:
            # At a terminal the question is on screen already; piped input gets it echoed.
            reply = ask(model, tokenizer, pictures, question, history, sampling, as_json, header=not tty)
        except UserError as e:   # e.g. a question too long to fit: say so, keep the conversation
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                        args.max_new_tokens)
    try:
        weights = resolve_weights(args.weight, args.out_dir, size_tag(args.dim, args.use_moe))
        pictures = load_pictures(args.image or [EVAL_MULTI_IMAGES if args.multi else EVAL_IMAGES])
        if not pictures:
            raise UserError("no readable pictures to ask about")
        model = load_model(weights, args.vision_model, device)
        tokenizer = load_tokenizer()
        if args.interactive:
            chosen = pictures if args.multi else pictures[:1]
            interactive(model, tokenizer, chosen, sampling, args.json)
        else:
            for group in [pictures] if args.multi else [[p] for p in pictures]:
                ask(model, tokenizer, group, args.prompt, (), sampling, args.json)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
