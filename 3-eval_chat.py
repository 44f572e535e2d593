"""Ask MiniMind-V about pictures from the terminal.

    python 3-eval_chat.py                          # every picture in dataset/eval_images
    python 3-eval_chat.py --weight pretrain        # out/512_vlm_pretrain.pth
    python 3-eval_chat.py --multi                  # the two bird pictures as one question
    python 3-eval_chat.py --image my.jpg --interactive
    python 3-eval_chat.py --weight out/minimind-v-512-hf --json
    python 3-eval_chat.py --image my_folder --batch_size 16   # 16 pictures at a time
    python 3-eval_chat.py --questions heldout.jsonl --images_dir heldout_images --batch_size 16
    python 3-eval_chat.py --video clip.mp4 --frames 4 --prompt "视频里发生了什么？"

A clip becomes --frames evenly spaced keyframes, one picture each (50 tokens each), introduced
in the prompt as the frames of one clip, in order.

Answers stream to stdout (at --batch_size 1; larger batches print each answer when its batch is
done); problems with the input go to stderr as one line each.

--questions FILE takes a file in the training data formats: JSON/JSONL records
{"image": "a.jpg, b.jpg", "conversations": [{"from": "human", "value": "<image>\n..."}, ...]} whose
pictures are in --images_dir, or Parquet with the pictures inside. Each record's FIRST question is
asked about the pictures its <image> marks stand for (later turns are not asked: the model would
need the record's own answers as history, and the first exchange is what data sets score); its
first answer, if any, is written as "reference" beside the model's. The marks' places in the text
are not kept: the pictures go at the start of the question, as in training data. Output: one JSON
line per answer, {"id", "image", "prompt", "answer"[, "reference"]}, in the order answered (prompts
of similar length are batched together). Bad records get one line each on stderr and are skipped.
"""
import argparse
import json
import os
import sys
from typing import List, NamedTuple

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset.records import BadRecord, conversation, open_records  # noqa: E402
from model.config import IMAGE_MARK, device_name, number_in, size_tag  # noqa: E402
from model.inference import (  # noqa: E402
    DEFAULT_OUT_DIR, DEFAULT_QUESTION, EVAL_IMAGES, EVAL_MULTI_IMAGES, EVAL_MULTI_QUESTION, IMAGE_EXTENSIONS,
    Request, Sampling, UserError, check_text, iter_answers, list_files, load_model, resolve_weights,
    reuse_freed_memory, stream_answer)
from model.prompt import DEFAULT_FRAMES, load_tokenizer  # noqa: E402
from model.video import VIDEO_EXTENSIONS, VideoError, read_keyframes  # noqa: E402
from model.vision import ImageError, load_image  # noqa: E402


def parse_args(argv=None):
    d = Sampling()
    p = argparse.ArgumentParser(description="Chat with MiniMind-V about pictures.")
    p.add_argument("--weight", default=None,
                   help="pretrain | sft | sft_multi | sft_video (-> OUT_DIR/{dim}[_moe]_vlm_{weight}.pth), "
                        "a .pth file, or a folder written by scripts/export_model.py (default: sft, "
                        "sft_multi with --multi, as in v1)")
    p.add_argument("--out_dir", default=DEFAULT_OUT_DIR)
    p.add_argument("--dim", type=int, default=512, help="picks the file name with --weight NAME")
    p.add_argument("--use_moe", action="store_true", help="picks the *_moe_* file with --weight NAME")
    p.add_argument("--vision_model", default=None,
                   help="CLIP folder (default: the one an export recorded, else "
                        "model/vision_model/clip-vit-base-patch32, or demo-clip for demo weights)")
    p.add_argument("--image", nargs="+", default=None, help="picture files and/or folders "
                   "(default: dataset/eval_images, or the bird pictures with --multi)")
    p.add_argument("--prompt", default=None,
                   help=f"default: {DEFAULT_QUESTION} (v1's); with --multi and its bird pictures, "
                        f"v1's \"{EVAL_MULTI_QUESTION}\"")
    p.add_argument("--video", nargs="+", default=None,
                   help="video files and/or folders, each clip asked about through its keyframes")
    p.add_argument("--frames", type=number_in(int, 1), default=DEFAULT_FRAMES, help="keyframes taken from each clip")
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
    p.add_argument("--batch_size", type=number_in(int, 1), default=1,
                   help="questions answered at once (the pictures of --image, or --questions): faster; "
                        "answers are printed when their batch is done. 1 (default) streams each answer")
    p.add_argument("--questions", default=None, metavar="FILE",
                   help="ask every record's first question of a JSON/JSONL (with --images_dir) or Parquet "
                        "data file; one JSON line per answer (see the top of this file)")
    p.add_argument("--images_dir", default=None, help="the pictures of a JSON/JSONL --questions file")
    p.add_argument("--output", default=None, metavar="FILE", help="write --questions' JSON lines here, not stdout")
    p.add_argument("--device", type=device_name, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (on CUDA it is replayed as a CUDA graph either way): "
                        "costs seconds once, pays off over long sessions (README: Speed)")
    p.add_argument("--seed", type=int, default=1337,
                   help="of the sampling: the same answers from run to run, as v1 gave (its seed). With "
                        "temperature > 0 the answers depend on --batch_size too (a batch's rows share the "
                        "random draws); greedy answers do not")
    args = p.parse_args(argv)
    if args.questions and (args.image or args.video or args.multi or args.interactive):
        p.error("--questions brings its own pictures and questions: drop --image, --video, --multi and --interactive")
    if not args.questions and (args.images_dir or args.output):
        p.error("--images_dir and --output go with --questions")
    if args.interactive and args.batch_size > 1:
        p.error("--interactive answers one question at a time: drop --batch_size")
    args.weight = args.weight or ("sft_multi" if args.multi else "sft")
    if args.prompt is None:
        args.prompt = EVAL_MULTI_QUESTION if args.multi and not args.image else DEFAULT_QUESTION
    elif not args.prompt.strip():   # e.g. an unset shell variable: the model would answer nothing asked
        p.error("--prompt is empty: give a question, or leave --prompt out to ask the default one")
    return args


class Subject(NamedTuple):
    """What one question is about: some pictures, or the keyframes of one clip."""
    paths: List[str]      # the picture files, or [the clip's file]
    images: list
    clip: bool = False

    @property
    def label(self) -> str:
        names = ", ".join(os.path.basename(p) for p in self.paths)
        return f"{names}, {len(self.images)} frames" if self.clip else names


def load_pictures(paths):
    """[(path, image)] for every readable picture; the others get one line on stderr."""
    pictures = []
    for given in paths:
        files = list_files([given])
        if not files:
            print(f"skipped: {given} holds no pictures ({', '.join(IMAGE_EXTENSIONS)})", file=sys.stderr)
        for path in files:
            try:
                pictures.append((path, load_image(path, name=path)))
            except ImageError as e:
                print(f"skipped: {e}", file=sys.stderr)
    return pictures


def load_clips(paths, frames):
    """A Subject for every readable clip (folders: the clips in them); the others get one line
    on stderr."""
    clips = []
    for given in paths:
        files = list_files([given], VIDEO_EXTENSIONS)
        if not files:
            print(f"skipped: {given} holds no clips ({', '.join(VIDEO_EXTENSIONS)})", file=sys.stderr)
        for path in files:
            try:
                clips.append(Subject([path], read_keyframes(path, frames, name=path), clip=True))
            except VideoError as e:
                print(f"skipped: {e}", file=sys.stderr)
    return clips


def ask(model, tokenizer, subject, question, history, sampling, as_json, header=True):
    """Stream one answer to stdout (or print it as a JSON line); returns the text."""
    check_text(question)   # before the header: a question that cannot be asked is not echoed
    if header and not as_json:
        print(f"[{subject.label}] {question}", flush=True)
    pieces = []
    for piece in stream_answer(model, tokenizer, subject.images, question, history, sampling, subject.clip):
        pieces.append(piece)
        if not as_json:
            print(piece, end="", flush=True)
    text = "".join(pieces)
    if as_json:
        print(json_line(subject, question, text), flush=True)
    else:
        print("\n", flush=True)
    return text


def json_line(subject, question, text):
    if subject.clip:
        about = {"video": subject.paths[0], "frames": len(subject.images)}
    else:
        about = {"image": subject.paths if len(subject.paths) != 1 else subject.paths[0]}
    return json.dumps({**about, "prompt": question, "answer": text}, ensure_ascii=False)


def ask_in_batches(model, tokenizer, subjects, question, sampling, as_json, batch_size):
    """Answer `question` about every subject, `batch_size` at a time, printing each answer when
    its batch is done. Returns how many were answered."""
    requests = [Request(question, s.images, clip=s.clip) for s in subjects]
    answered = 0
    for index, result in iter_answers(model, tokenizer, requests, sampling, batch_size):
        subject = subjects[index]
        if result.error is not None:   # e.g. too long for this model: the other answers still come
            print(f"error: [{subject.label}] {result.error}", file=sys.stderr, flush=True)
            continue
        answered += 1
        if as_json:
            print(json_line(subject, question, result.text), flush=True)
        else:
            print(f"[{subject.label}] {question}\n{result.text}\n", flush=True)
    return answered


# -- --questions FILE -----------------------------------------------------------------------------
def first_exchange(turns, pictures):
    """(a record's first question without its <image> marks, the pictures those marks stand for,
    the record's first answer or None); BadRecord if the record does not check."""
    if not all(isinstance(p, (str, bytes)) for p in pictures):   # keyframes of a clip
        raise BadRecord("video clips are not supported by --questions")
    messages = conversation(turns, len(pictures), unanswered=True)   # question-only records too
    first = messages[0]["content"]
    question = first.replace(IMAGE_MARK + "\n", "").replace(IMAGE_MARK, "")
    reference = messages[1]["content"] if len(messages) > 1 else None
    return question, pictures[:first.count(IMAGE_MARK)], reference


def open_questions(path, images_dir):
    from dataset.parquet import is_parquet

    if not is_parquet(path):
        if not os.path.isfile(path):
            raise UserError(f"question file not found: {path}")
        if images_dir is None:
            raise UserError(f"{path} names its pictures by file: give their folder with --images_dir")
        if not os.path.isdir(images_dir):
            raise UserError(f"images folder not found: {images_dir}")
    try:
        source = open_records(path, images_dir, unanswered=True)
    except (OSError, ValueError) as e:   # not JSON / not our Parquet layout / unreadable
        raise UserError(str(e).splitlines()[0]) from None
    if getattr(source, "prefix_note", None):
        say(source.prefix_note)
    return source


def say(message):
    """A line on stderr that leaves the progress bar (if any) intact."""
    tqdm.write(message, file=sys.stderr)


def question_requests(source, images_dir, records, progress):
    """A Request for every usable record of `source`, putting (ref, its output fields, its
    reference answer) in `records` under the request's number as it goes; the other records get
    one line each on stderr."""
    for ref, reason in getattr(source, "load_problems", []):   # JSON records that failed the checks
        say(f"skipped: {ref}: {reason}")
    number = 0
    for i in range(len(source)):
        ref = source.ref(i)
        try:
            raw = source.read(i)
            question, pictures, reference = first_exchange(raw.turns, raw.pictures)
        except BadRecord as bad:
            say(f"skipped: {ref}: {bad}")
            progress.update()
            continue
        # Pictures stored inside the file (Parquet) have no names.
        image = (", ".join(os.path.relpath(p, images_dir) for p in pictures)
                 if all(isinstance(p, str) for p in pictures) else None)
        fields = {"id": raw.record_id if raw.record_id is not None else ref, "image": image, "prompt": question}
        records[number] = (ref, fields, reference)
        number += 1
        yield Request(question, pictures)


def answer_lines(model, tokenizer, source, args, sampling, progress):
    """The JSON line of every answered record, in the order answered."""
    records = {}   # of the requests read but not answered yet: memory bounded by iter_answers' window
    requests = question_requests(source, args.images_dir, records, progress)
    for index, result in iter_answers(model, tokenizer, requests, sampling, args.batch_size):
        progress.update()
        ref, fields, reference = records.pop(index)
        if result.error is not None:   # a picture that cannot be read, a question too long, ...
            say(f"skipped: {ref}: {result.error}")
            continue
        line = {**fields, "answer": result.text}
        if reference is not None:
            line["reference"] = reference
        yield json.dumps(line, ensure_ascii=False)


def interactive(model, tokenizer, subject, sampling, as_json):
    history = []
    tty = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):
        # A line that is not UTF-8 then costs one error message (see check_text), not the chat.
        sys.stdin.reconfigure(errors="surrogateescape")
    if tty:
        print(f"Chatting about {subject.label}; an empty line or `exit` ends.", file=sys.stderr)
    while True:
        try:
            question = input("> " if tty else "").strip()
        except EOFError:
            break
        if not question or question.lower() in ("exit", "quit"):
            break
        try:
            # At a terminal the question is on screen already; piped input gets it echoed.
            reply = ask(model, tokenizer, subject, question, history, sampling, as_json, header=not tty)
        except UserError as e:   # e.g. a question too long to fit: say so, keep the conversation
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def main(argv=None) -> int:
    args = parse_args(argv)
    reuse_freed_memory()   # batched answers allocate and free megabytes per layer
    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                        args.max_new_tokens)
    try:
        weights = resolve_weights(args.weight, args.out_dir, size_tag(args.dim, args.use_moe))
        if args.questions:
            return questions_main(weights, args, device, sampling)
        check_text(args.prompt)
        subjects = load_clips(args.video, args.frames) if args.video else []
        if args.image or not args.video:
            pictures = load_pictures(args.image or [EVAL_MULTI_IMAGES if args.multi else EVAL_IMAGES])
            groups = [pictures] if args.multi and pictures else [[p] for p in pictures]
            subjects += [Subject([p for p, _ in g], [im for _, im in g]) for g in groups]
        if not subjects:
            raise UserError("no readable pictures or clips to ask about")
        model = load_model(weights, args.vision_model, device, args.compile)
        tokenizer = load_tokenizer()
        if args.interactive:
            interactive(model, tokenizer, subjects[0], sampling, args.json)
        elif args.batch_size == 1:   # streamed, piece by piece
            for subject in subjects:
                ask(model, tokenizer, subject, args.prompt, (), sampling, args.json)
        elif not ask_in_batches(model, tokenizer, subjects, args.prompt, sampling, args.json, args.batch_size):
            raise UserError("no question could be answered")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def questions_main(weights, args, device, sampling) -> int:
    source = open_questions(args.questions, args.images_dir)
    model = load_model(weights, args.vision_model, device, args.compile)
    tokenizer = load_tokenizer()
    try:
        if args.output:   # its folder is made, as training makes --out_dir
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    except OSError as e:
        raise UserError(f"cannot write {args.output}: {e.strerror}") from None
    to_file = out is not sys.stdout
    answered = 0
    # Answers going to a file leave the terminal silent: a progress bar (on a terminal) says how
    # far it has got, and the last line how many answers the file holds.
    progress = tqdm(total=len(source), desc="answering", unit=" records", file=sys.stderr,
                    disable=None if to_file else True)
    try:
        for line in answer_lines(model, tokenizer, source, args, sampling, progress):
            print(line, file=out, flush=True)
            answered += 1
    except KeyboardInterrupt:
        progress.close()
        say(f"\ninterrupted: {args.output or 'stdout'} holds the {answered} answer(s) written so far")
        return 130
    finally:
        progress.close()
        if to_file:
            out.close()
    if not answered:
        raise UserError(f"no question of {args.questions} could be answered (see the lines above)")
    if to_file:
        records = getattr(source, "n_read", len(source))
        say(f"{answered} answer(s) to the {records} record(s) of {args.questions} written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
