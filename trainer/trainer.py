"""The one trainer behind `1-pretrain_vlm.py` and `2-sft_vlm.py`.

Stages differ only in defaults (data, which checkpoint to start from, what to save, what to
train); everything else - DDP, mixed precision, accumulation, resume, feature cache, logging -
is this file. `train()` is the loop; the named pieces it calls are below it, in the order it
calls them. Run under torchrun for several GPUs (or CPU processes with gloo):

    torchrun --nproc_per_node 2 1-pretrain_vlm.py --epochs 1
"""
import argparse
import contextlib
import errno
import gc
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
import torch.distributed as dist

from dataset.records import IMAGE_PREFIX_HELP, check_data_path
from dataset.vlm_dataset import DEFAULT_MAX_SEQ_LEN, Skipped, VLMDataset, make_collate, problem_kinds
from model.checkpoint import (CheckpointError, atomic_output, atomic_save, load_weights, model_state_dict,
                              remove_stale_temp_files)
from model.config import IGNORE_INDEX, PRESETS, VLMConfig, default_vision_model, device_name, number_in
from model.language import count_targets
from model.prompt import DEFAULT_FRAMES, load_tokenizer
from model.vision import ImagePreprocessor, VisionEncoder, check_vision_folder
from model.vlm import MiniMindVLM
from trainer.resume import (FORMAT, Progress, ResumeError, check_same_data_order, check_same_global_batch,
                            load_resume_state, rng_state, set_rng_state, unfinished_step)

log = logging.getLogger("minimind_v")


@dataclass(frozen=True, kw_only=True)
class Stage:
    name: str            # pretrain | sft | sft_multi: the output is out/{tag}_vlm_{name}.pth
    init_from: str       # what the default starting weights are called
    data_paths: tuple    # default data, the first that exists: the official Parquet, JSONL, v1's JSON
    images_dir: str      # the pictures of the JSON(L) data (Parquet holds its own)
    learning_rate: float
    epochs: int
    freeze_llm: bool     # default for --freeze_llm (pretrain from an LLM: projector only)
    max_images: int


STAGES = {
    "pretrain": Stage(name="pretrain", init_from="llm",
                      data_paths=("dataset/pretrain_i2t.parquet", "dataset/pretrain_data.jsonl",
                                  "dataset/LLaVA-Pretrain/chat-translated.json"),
                      images_dir="dataset/pretrain_images", learning_rate=4e-4, epochs=4, freeze_llm=True,
                      max_images=1),
    # SFT takes up to 4 pictures a sample: a clip's 4 keyframes (--frames) need no extra flag.
    "sft": Stage(name="sft", init_from="vlm_pretrain",
                 data_paths=("dataset/sft_i2t.parquet", "dataset/sft_data.jsonl",
                             "dataset/LLaVA-Instruct/llava_instruct_230k.json"),
                 images_dir="dataset/sft_images", learning_rate=1e-5, epochs=4, freeze_llm=False, max_images=4),
    "sft_multi": Stage(name="sft_multi", init_from="vlm_sft",
                       data_paths=("dataset/sft_multi_data.jsonl", "dataset/sft_multi_images/output.json"),
                       images_dir="dataset/sft_multi_images", learning_rate=1e-5, epochs=4, freeze_llm=False,
                       max_images=4),
}


# =========================================================================== the loop
def train(args) -> int:
    run = start_run(args)
    tokenizer = load_tokenizer()
    if args.check_data:
        return check_data_only(args, tokenizer)
    check_inputs(args)
    check_outputs_writable(args, run)
    encoder = VisionEncoder.from_pretrained(args.vision_model, layer=args.config.vision_layer,
                                            squash=args.config.squash_images)
    model, ddp_model = build_model(args, run, encoder)   # first: its random init is drawn from the seed
    data = build_data(args, run, tokenizer, args.data_path, args.images_path, encoder)
    val = build_data(args, run, tokenizer, args.val_data, args.val_images_path or args.images_path,
                     encoder, validation=True) if args.val_data else None
    optimizer = model.configure_optimizer(args.weight_decay, args.learning_rate, betas=(0.9, 0.95))
    total_steps = data.steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 100)
    progress = resume(args, run, model, optimizer, len(data.dataset)) if args.resume else Progress()
    earlier = unfinished_step(args.resume_path) if not args.resume and run.master else None
    if earlier is not None:   # a crash, then the same command without --resume?
        log.warning("%s holds step %d of an unfinished run, which this one (from step 0) replaces at its first "
                    "save: to go on with that run instead, stop now and add --resume", args.resume_path, earlier)
    if progress.step >= total_steps:   # --resume of a run that had finished
        run.info("%s holds step %d of %d: nothing left to train (raise --epochs or --max_steps to go on)",
                 args.resume_path, progress.step, total_steps)
    logger = StepLogger(args, run, progress, total_steps)

    model.train()
    saved_step = progress.step or None   # a resumed run starts from its last save
    try:
        while progress.step < total_steps:
            epoch = progress.epoch
            data.sampler.set_epoch(epoch, start_step=progress.steps_in_epoch)
            logger.start_epoch(data)
            for micro_batches in steps_of(data.loader, args.accumulation_steps):
                data.note_skipped(run, micro_batches)
                lr = lr_at(progress.step, total_steps, warmup, args.learning_rate)
                loss, grad_norm = optimizer_step(run, ddp_model, optimizer, micro_batches, lr, args.grad_clip)
                progress.advance(data.steps_per_epoch)
                last = progress.step >= total_steps
                logged = logger.after_step(loss, grad_norm, lr, micro_batches, last)
                saving = progress.step % args.save_interval == 0 or last or progress.epoch != epoch
                if logged or saving:   # before saving: a run that found nothing usable stops there
                    data.share_problems(run, last)
                if val is not None and (progress.step % args.val_interval == 0 or last):
                    logger.validation(validate(run, model, val))
                if saving:
                    with ctrl_c_held_back():
                        save_checkpoint(args, run, model, optimizer, progress, total_steps, len(data.dataset))
                        saved_step = progress.step
                if last:
                    break
            data.check_left_out(run, epoch)
            logger.end_epoch(epoch, data)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(args, progress.step, total_steps, saved_step)) from None
    logger.finish()
    if dist.is_initialized():
        # All ranks leave together (rank 0 may still be writing the loss plot): once in CI a rank
        # that tore its gloo connections down while its peer still ran aborted at exit (SIGABRT),
        # failing a finished run.
        dist.barrier()
        # The DDP wrapper sits in reference cycles, so it would outlive this function and be
        # freed by the garbage collector during interpreter shutdown, with its process group's
        # work: free it now, while everything it refers to is still alive.
        del ddp_model
        gc.collect()
        dist.destroy_process_group()
    return 0


class Interrupted(Exception):
    """Ctrl-C during training; the message says what was kept."""


class MissingInputs(Exception):
    """Several inputs of the run are not there; the message names each on a line of its own."""


@contextlib.contextmanager
def ctrl_c_held_back():
    """Hold a Ctrl-C back until the block is done, then raise it: the weights and the resume file
    are saved as a pair, so an interrupt never leaves them one save apart. (Only where Python's
    own Ctrl-C handler is in place: a launcher that ignores SIGINT keeps its choice.)"""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


def interrupted_message(args, step: int, total_steps: int, saved_step) -> str:
    where = f"interrupted at step {step} of {total_steps}"
    if saved_step is None:
        return (f"{where}, before the first save (every {args.save_interval} steps, --save_interval): "
                "no weights were written")
    return (f"{where}; {args.save_weight} and its resume file hold step {saved_step}: run the same command "
            f"with --resume to go on from there")


def main(stage: str, argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = resolve(build_parser(stage).parse_args(argv), stage)
    try:
        sys.exit(train(args))
    except (Interrupted, KeyboardInterrupt) as e:   # the latter: before training started
        # A terminal's Ctrl-C reaches every rank, and they all hold the same saved step: rank 0 says so.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\n{e or 'interrupted before training started: no weights were written'}", file=sys.stderr)
        sys.exit(130)   # the shell's code for a run stopped by Ctrl-C
    except MissingInputs as e:
        stop(f"error: {e}")
    except (FileNotFoundError, ValueError, CheckpointError, ResumeError) as e:
        # User errors (missing folders, bad checkpoints, bad data under --strict): one line.
        stop(f"error: {str(e).splitlines()[0]}")
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            # Checkpoints say so themselves (atomic_save); this is the history or the loss plot.
            stop(f"error: no space left on the device while writing {e.filename or 'the run outputs'}; "
                 f"the weights saved so far are intact")
        if e.filename is None:   # not about a file the user named: a real failure, keep its traceback
            raise
        stop(f"error: {e.filename}: {e.strerror}")   # e.g. permission denied


def stop(message: str):
    """Exit with a one-line error. Under torchrun every failing rank says why (most errors reach
    every rank, see `first_problem_of_all_ranks`, but one may fail alone), each line in one
    write, so that several ranks' lines never run into one another; ranks after 0 name themselves."""
    if "RANK" not in os.environ:
        raise SystemExit(message)
    rank = int(os.environ["RANK"])
    os.write(sys.stderr.fileno(), f"{f'[rank {rank}] ' if rank else ''}{message}\n".encode(errors="replace"))
    raise SystemExit(1)


# =========================================================================== arguments
def usable_cpus() -> int:
    """The CPUs this process may run on (a container or `taskset` can allow fewer than the host has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser(stage: str) -> argparse.ArgumentParser:
    s = STAGES[stage]
    p = argparse.ArgumentParser(description=f"MiniMind-V {stage} training")
    if stage == "sft":
        p.add_argument("--multi", nargs="?", const=True, default=False, type=v1_bool,
                       help="two-image SFT: sft_multi data, starts from the SFT weights (v1's `--multi True` "
                            "works too)")
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=int, default=512, choices=[512, 768], help="model width (512: 27M, 768: 109M)")
    g.add_argument("--n_layers", type=number_in(int, 1), default=None, help="default: 8 for dim 512, 16 for dim 768")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named size; overrides --dim")
    g.add_argument("--use_moe", action="store_true")
    g.add_argument("--max_seq_len", type=number_in(int, 1), default=DEFAULT_MAX_SEQ_LEN,
                   help="longest sample in tokens (50 per image)")
    g.add_argument("--vision_model", default=None,
                   help="CLIP folder (default: model/vision_model/clip-vit-base-patch32, or v1's model/clip_model/...)")
    g.add_argument("--init_weight", default=None,
                   help=f"starting weights, a .pth or an exported folder (default: out/{{tag}}_{s.init_from}.pth)")
    g.add_argument("--from_scratch", action="store_true", help="random LLM + projector (no starting weights)")
    g.add_argument("--save_weight", default=None, help="output weights (default: out/{tag}_vlm_<stage>.pth)")
    g.add_argument("--freeze_llm", action=argparse.BooleanOptionalAction, default=None,
                   help="train the projector only (default: yes in pretrain from an LLM, no otherwise)")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None,
                   help="Parquet (a file, a folder of shards or a glob) or JSON/JSONL records with --images_path "
                        f"(default: the first that exists of {', '.join(s.data_paths)})")
    g.add_argument("--images_path", default=None, help=f"image folder (default {s.images_dir})")
    g.add_argument("--image_prefix", default=None, help=IMAGE_PREFIX_HELP)
    g.add_argument("--max_images", type=number_in(int, 1), default=None,
                   help=f"pictures per record, a clip's keyframes included (default {s.max_images})")
    g.add_argument("--frames", type=number_in(int, 1), default=DEFAULT_FRAMES,
                   help="keyframes of a clip whose record does not say")
    g.add_argument("--max_turns", type=number_in(int, 1), default=None,
                   help="keep the first N exchanges (1 = v1 behaviour)")
    g.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    g.add_argument("--check_data", action="store_true", help="scan the data, report problems, do not train")
    g.add_argument("--group_by_length", action="store_true", help="batch samples of similar length")
    g.add_argument("--cache_features", action="store_true", help="encode each image once, train from the cache")
    g.add_argument("--cache_dir", default=None, help="default: <out_dir>/feature_cache")
    g.add_argument("--val_data", default=None, help="held-out records for a periodic validation loss")
    g.add_argument("--val_images_path", default=None)
    g.add_argument("--val_interval", type=number_in(int, 1), default=200)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=number_in(int, 1), default=s.epochs)
    g.add_argument("--max_steps", type=number_in(int, 1), default=None, help="stop after this many optimizer steps")
    g.add_argument("--batch_size", type=number_in(int, 1), default=16, help="per process")
    g.add_argument("--learning_rate", type=number_in(float, 0), default=s.learning_rate)
    g.add_argument("--weight_decay", type=number_in(float, 0), default=0.01,
                   help="on matrices only (not norms or biases)")
    g.add_argument("--warmup_steps", "--warmup_iters", type=number_in(int, 0), default=None,
                   help="default: 1%% of the steps")
    g.add_argument("--accumulation_steps", type=number_in(int, 1), default=1)
    g.add_argument("--grad_clip", type=number_in(float, 0, low_open=True), default=1.0)
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="autocast dtype on CUDA (CPU always trains in fp32)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder block (see README: Speed for when it pays)")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default="out")
    g.add_argument("--device", type=device_name, default=None, help="default: cuda if available, else cpu")
    g.add_argument("--num_workers", type=number_in(int, 0), default=min(4, usable_cpus()),
                   help="data loading processes per GPU (default: 4, at most the CPUs this process may use)")
    g.add_argument("--log_interval", type=number_in(int, 1), default=10)
    g.add_argument("--save_interval", type=number_in(int, 1), default=500,
                   help="save weights + resume state every N steps")
    g.add_argument("--resume", action="store_true", help="continue from <save_weight>.resume if it exists")
    g.add_argument("--use_wandb", action="store_true")
    g.add_argument("--wandb_project", default="MiniMind-V")
    g.add_argument("--wandb_run_name", default=None, help="default: {tag}_vlm_{stage}")
    g.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
    g = p.add_argument_group("v1's other flags, taken so that its command lines run")
    g.add_argument("--ddp", action="store_true", help="changes nothing: under torchrun DDP is on by itself")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="changes nothing: torch.distributed.launch passes it, LOCAL_RANK is read")
    g.add_argument("--visual_encoder", choices=["clip"], default="clip",
                   help="changes nothing: the encoder is CLIP, from --vision_model")
    if stage == "sft":
        g.add_argument("--data_path_multi", default=None, help="--multi's data (as --data_path with --multi)")
        g.add_argument("--save_last", type=v1_bool, default=True, help="changes nothing: the last step is always saved")
    return p


def v1_bool(word: str) -> bool:
    """v1's `type=bool` flags took a word (`--multi True`) and read any word, "False" too, as true;
    here the word means what it says."""
    meaning = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(word.lower())
    if meaning is None:
        raise argparse.ArgumentTypeError(f"{word!r} is not True or False")
    return meaning


def resolve(args, stage: str):
    """Fill in the defaults that depend on other flags."""
    if stage == "sft" and getattr(args, "multi", False):
        stage = "sft_multi"
        args.data_path = args.data_path or args.data_path_multi
    s = STAGES[stage]
    args.stage = s.name
    args.vision_model = args.vision_model or default_vision_model()
    cfg = VLMConfig.from_preset(args.preset or str(args.dim), use_moe=args.use_moe,
                                vision_model_path=args.vision_model)
    cfg.max_seq_len = max(cfg.max_seq_len, args.max_seq_len)
    if args.n_layers is not None:
        cfg.n_layers = args.n_layers
    args.config = cfg
    tag = cfg.tag
    args.data_path = args.data_path or next((p for p in s.data_paths if os.path.exists(p)), s.data_paths[0])
    args.images_path = args.images_path or s.images_dir
    args.max_images = args.max_images or s.max_images
    args.init_weight = None if args.from_scratch else (
        args.init_weight or os.path.join(args.out_dir, f"{tag}_{s.init_from}.pth"))
    args.save_weight = args.save_weight or os.path.join(args.out_dir, f"{tag}_vlm_{s.name}.pth")
    args.resume_path = args.save_weight + ".resume"
    if args.freeze_llm is None:
        args.freeze_llm = s.freeze_llm and not args.from_scratch
    args.cache_dir = args.cache_dir or os.path.join(args.out_dir, "feature_cache")
    args.wandb_run_name = args.wandb_run_name or f"{tag}_vlm_{s.name}"
    return args


# =========================================================================== set-up
@dataclass
class Run:
    """Which process this is, on which device, and with which precision."""
    rank: int
    local_rank: int
    world: int
    device: torch.device
    amp: contextlib.AbstractContextManager
    scaler: torch.amp.GradScaler

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def info(self, msg, *a):
        if self.master:
            log.info(msg, *a)


def start_run(args) -> Run:
    """Processes (torchrun sets RANK/WORLD_SIZE; nccl on CUDA, gloo on CPU), device, seeds and
    mixed precision."""
    rank, local_rank, world = 0, 0, 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        use_cuda = torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    torch.manual_seed(args.seed + rank)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    cuda = device.type == "cuda"
    # Mixed precision only on CUDA and always with an explicit dtype; the loss scaler is for
    # fp16 alone (bf16 has fp32's range and needs none).
    amp = torch.autocast("cuda", dtype=dtype) if cuda and dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and dtype == torch.float16)
    return Run(rank, local_rank, world, device, amp, scaler)


def check_data_only(args, tokenizer) -> int:
    from scripts.check_data import scan

    checked = scan(args.data_path, args.images_path, image_prefix=args.image_prefix, max_seq_len=args.max_seq_len,
                   max_images=args.max_images, max_turns=args.max_turns, frames=args.frames,
                   tokenizer=tokenizer, image_ids=args.config.image_ids, progress=not args.no_progress)
    print(checked.summary())
    return 1 if checked.problems else 0


def check_inputs(args):
    """Every input that is not there or not usable (CLIP, data, starting weights), named before
    anything is loaded: a user setting up a machine learns from one run all that is left to get."""
    def problem(check, path):
        try:
            check(path)
        except (FileNotFoundError, ValueError) as e:
            return str(e).splitlines()[0]

    problems = [problem(check_vision_folder, args.vision_model)]
    defaults = STAGES[args.stage].data_paths
    if args.data_path in defaults and not any(os.path.exists(p) for p in defaults):
        places = f"{', '.join(defaults[:-1])} or {defaults[-1]}" if len(defaults) > 1 else defaults[0]
        problems.append(f"no training data at {places} (see README: Using the real weights and data): put it "
                        f"there, or give --data_path")
    else:
        problems.append(problem(check_data_path, args.data_path))
    if args.val_data:
        problems.append(problem(check_data_path, args.val_data))
    if args.init_weight and not os.path.exists(args.init_weight):   # a .pth file or an exported folder
        llm = f"full_sft_{args.config.tag}.pth"
        hint = (f"download MiniMind's {llm} and save it under that name, or pass --from_scratch"
                if args.stage == "pretrain" else "run the previous stage first, or pass --init_weight")
        problems.append(f"starting weights {args.init_weight} not found: {hint}")
    problems = [p for p in problems if p]
    if len(problems) == 1:
        raise FileNotFoundError(problems[0])
    if problems:
        raise MissingInputs("\n".join([f"{len(problems)} inputs of this run are missing or unusable:"] +
                                       [f"  - {p}" for p in problems]))


def check_outputs_writable(args, run: Run):
    """Fail now, in one line, rather than at the first save hours in; and clear the temp files
    a run killed while saving left behind."""
    folders = {os.path.dirname(os.path.abspath(p)) for p in (args.save_weight, args.resume_path)}
    folders.add(os.path.abspath(args.out_dir))
    if args.cache_features:
        folders.add(os.path.abspath(args.cache_dir))
    for folder in sorted(folders):
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f".write-test-{os.getpid()}-r{run.rank}")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as e:
            raise ValueError(f"cannot write to {folder}: {e.strerror or e}") from None
    if run.master:
        for path in (args.save_weight, args.resume_path):
            remove_stale_temp_files(path)


# Records read by all ranks, not one of them usable, after which a run stops (see
# `TrainingData.share_problems`): at that point it is the flags or the data, not a bad record.
NOTHING_USABLE_LIMIT = 256
# Bad records logged one line each; after these they are counted (a few among millions of rows
# are worth naming, a whole folder of missing pictures is not worth a line per record).
PROBLEMS_LOGGED = 100


@dataclass
class TrainingData:
    """A dataset with its sampler and loader, and how many of the samples this process read
    were usable."""
    dataset: VLMDataset
    sampler: "StepSampler"
    loader: torch.utils.data.DataLoader
    read: int = 0
    usable: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler) // self.sampler.accumulation

    def note_skipped(self, run: "Run", micro_batches):
        """Records found bad while loading these batches: counted (strict: the one-line error).
        This happens here in the main process, as a DataLoader worker cannot stop a run cleanly.
        Under --strict every rank stops at once, with the same line: a rank stopping alone left
        the others a traceback when their next collective found it gone."""
        bad = None
        for batch in micro_batches:
            for ref, reason in batch["skipped"]:
                if self.dataset.strict:
                    bad = bad or (ref, reason)
                else:
                    self.dataset.report(ref, reason)
            self.usable += len(batch["input_ids"])
            self.read += len(batch["input_ids"]) + len(batch["skipped"])
        if self.dataset.strict:
            bad = first_problem_of_all_ranks(run, bad)
            if bad is not None:
                self.dataset.report(*bad)   # raises the one-line error

    def share_problems(self, run: "Run", last: bool = False):
        """Every rank learns every rank's bad records, so counts are totals and rank 0 logs each
        record once (a bad record lands on another rank in another epoch).

        Skipping bad records is for a few among many. When not one of the records read so far
        (by all ranks together) was usable, after NOTHING_USABLE_LIMIT of them, a whole epoch
        or at the last step, the run stops with one line (ValueError) before anything is saved.
        Otherwise a --max_seq_len too short for the data, or Parquet rows with more pictures than
        --max_images (checked as they are read), would "train" for hours on nothing and write
        the untouched weights over the last good ones."""
        read, usable = self.read, self.usable
        if run.world > 1:
            gathered = all_gather_objects((self.dataset.take_new_problems(), (self.read, self.usable)))
            for problems, _ in gathered:
                for ref, reason in problems:
                    self.dataset.report(ref, reason)
            read, usable = (sum(counts[i] for _, counts in gathered) for i in (0, 1))
        epoch_reads = self.steps_per_epoch * self.sampler.step_batch   # the ragged tail is not read
        if usable == 0 and read and (read >= min(NOTHING_USABLE_LIMIT, epoch_reads) or last):
            kinds = problem_kinds(self.dataset.problems)
            raise ValueError(f"none of the {read} records read from {self.dataset.data_path} was usable ("
                             + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(3))
                             + "): nothing trained, nothing saved. Check the data and the flags "
                             "(python scripts/check_data.py lists every problem)")

    def check_left_out(self, run: "Run", epoch: int):
        """Load the ragged tail that `epoch` did not train on, so bad records there are counted too."""
        for index in self.sampler.left_out(epoch)[run.rank::run.world]:
            item = self.dataset[index]
            if isinstance(item, Skipped):
                self.dataset.report(item.record_ref, item.reason)
        self.share_problems(run)


def build_data(args, run: Run, tokenizer, data_path, images_path, encoder, validation=False) -> TrainingData:
    ds = VLMDataset(data_path, images_path, tokenizer, args.config.image_ids, max_seq_len=args.max_seq_len,
                    max_turns=args.max_turns, image_prefix=args.image_prefix, max_images=args.max_images,
                    strict=args.strict, log_limit=PROBLEMS_LOGGED if run.master else 0, frames=args.frames,
                    preprocess=ImagePreprocessor.from_pretrained(args.vision_model, args.config.squash_images))
    if args.cache_features:
        from trainer.feature_cache import FeatureCache

        ds.use_features(FeatureCache(args.cache_dir, encoder).prepare(
            ds.source, run.device, run.rank, run.world, all_gather=all_gather_objects, barrier=barrier,
            num_workers=args.num_workers, progress=run.master and not args.no_progress))
    run.info("%s", ds.summary())
    if validation and not len(ds):
        raise ValueError(f"{data_path} has no usable records to validate on")
    if not validation and len(ds) < args.batch_size * run.world * args.accumulation_steps:
        raise ValueError(f"{data_path} has {len(ds)} usable records, fewer than one global batch "
                         f"({args.batch_size} x {run.world} processes x {args.accumulation_steps} accumulation steps)")
    sampler = StepSampler(len(ds), args.batch_size, run.rank, run.world, args.accumulation_steps, args.seed,
                          ds.approx_lengths if args.group_by_length and not validation else None,
                          read_groups=ds.read_groups())
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler.covering_batches() if validation else sampler,
        collate_fn=make_collate(pad_id=0), num_workers=args.num_workers,
        pin_memory=run.cuda, prefetch_factor=4 if args.num_workers else None)
    return TrainingData(ds, sampler, loader)


def build_model(args, run: Run, encoder):
    """(model, the model to call for training: DDP-wrapped under torchrun)."""
    args.config.vision_hidden_size = encoder.hidden_size   # the projector's input is CLIP's width
    model = MiniMindVLM(args.config, encoder)
    if args.init_weight:   # there: see check_inputs
        run.info("loaded %s weights from %s", load_weights(model, args.init_weight), args.init_weight)
    for name, p in model.named_parameters():
        p.requires_grad = not args.freeze_llm or name.startswith("vision_proj.")
    model.to(run.device)
    if args.compile:
        model.compile_blocks()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.info("model %s: %.2fM parameters, %.2fM trainable%s", args.config.tag,
             sum(p.numel() for p in model.parameters()) / 1e6, n_train / 1e6,
             " (projector only)" if args.freeze_llm else "")
    if run.world == 1:
        return model, model
    # Every trainable parameter is in every step's graph (a text-only batch runs the projector on
    # no pictures, an MoE expert no token chose runs on none: see embed_inputs and
    # MoEFeedForward), so DDP need not search the graph for unused ones after each forward.
    return model, torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[run.local_rank] if run.cuda else None)


def resume(args, run: Run, model, optimizer, samples: int) -> Progress:
    """Continue from <save_weight>.resume: weights, optimizer, position in the data, RNG."""
    if not os.path.isfile(args.resume_path):
        run.info("no resume file at %s: starting fresh", args.resume_path)
        return Progress()
    state = load_resume_state(args.resume_path)
    check_same_global_batch(state, args.resume_path, args.batch_size, run.world, args.accumulation_steps)
    check_same_data_order(state, args.resume_path, samples, args.seed)
    load_weights(model, state["model"], name=args.resume_path)
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:   # empty from a bf16, fp32 or CPU run: a float16 run starts its scaler afresh
        run.scaler.load_state_dict(state["scaler"])
    if state["world_size"] == run.world:
        set_rng_state(state["rng"][run.rank])
    progress = Progress.from_state(state)
    run.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", args.resume_path, progress.step,
             progress.epoch + 1, progress.steps_in_epoch)
    return progress


# =========================================================================== data order
class StepSampler:
    """Seeded, epoch-dependent order of optimizer steps, shared by every rank, resumable.

    An optimizer step takes `step_batch` = batch_size x world x accumulation samples,
    perm[k*S:(k+1)*S] for step k; its micro-batch j on rank r is the slice number j*world + r.
    So the samples of a step, and how they are split into micro-batches, depend only on the
    global batch: 2 processes, or 1 process with accumulation 2, see the same micro-batches
    (DDP parity, and resuming on another number of GPUs), and skipping steps resumes exactly.
    `lengths` (optional) groups samples of similar length into the same step.
    `read_groups` (optional; (group of each sample, window)) shuffles windows of `window` groups
    at a time: every sample once per epoch, in random order within its window, with the windows
    in random order. Parquet rows are read a row group at a time, and a window is what a
    reader's cache holds, so each row group is decoded about once per epoch instead of once per
    sample.
    """

    def __init__(self, n, batch_size, rank=0, world=1, accumulation=1, seed=0, lengths=None, read_groups=None):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.accumulation, self.seed, self.lengths = accumulation, seed, lengths
        self.step_batch = batch_size * world * accumulation
        self.epoch, self.start_step = 0, 0
        self.group_starts = None
        if read_groups is not None:
            group_of, self.window = read_groups
            self.members = np.argsort(group_of, kind="stable")        # samples, group by group
            # members[group_starts[k]:group_starts[k + 1]] are the samples of group k
            self.group_starts = np.searchsorted(group_of[self.members], np.arange(int(group_of.max(initial=-1)) + 2))

    def _permutation(self, g) -> List[int]:
        if self.group_starts is None or self.window >= len(self.group_starts) - 1:   # one window: all
            return torch.randperm(self.n, generator=g).tolist()
        order, starts = [], self.group_starts
        groups = torch.randperm(len(starts) - 1, generator=g).tolist()
        for w in range(0, len(groups), self.window):
            window = np.concatenate([self.members[starts[k]:starts[k + 1]] for k in groups[w:w + self.window]])
            order += window[torch.randperm(len(window), generator=g).numpy()].tolist()
        return order

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def _order(self, epoch):
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = self._permutation(g)
        S = self.step_batch
        if self.lengths is not None:
            # Sort within windows of 50 steps, then shuffle the steps: similar lengths share a
            # step (less padding) while the order stays random.
            window = 50 * S
            perm = [i for s in range(0, self.n, window)
                    for i in sorted(perm[s:s + window], key=lambda i: -self.lengths[i])]
        steps = [perm[s:s + S] for s in range(0, self.n - S + 1, S)]   # the ragged tail is left out
        if self.lengths is not None:
            steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        return perm, steps

    def covering_batches(self) -> List[List[int]]:
        """This rank's batches over every sample once, in epoch 0's order, the last one short:
        for validation, where a held-out set smaller than one global batch is still a set."""
        perm, B = self._permutation(torch.Generator().manual_seed(self.seed)), self.batch_size
        return [perm[s:s + B] for s in range(self.rank * B, self.n, self.world * B)]

    def left_out(self, epoch) -> List[int]:
        """The samples of the ragged tail that `epoch` does not train on."""
        perm, steps = self._order(epoch)
        used = {i for step in steps for i in step}
        return [i for i in perm if i not in used]

    def __len__(self):
        """Micro-batches of this rank in an epoch."""
        return (self.n // self.step_batch) * self.accumulation

    def __iter__(self):
        B = self.batch_size
        for step in self._order(self.epoch)[1][self.start_step:]:
            for j in range(self.accumulation):
                k = j * self.world + self.rank
                yield step[k * B:(k + 1) * B]


def steps_of(loader, accumulation_steps):
    """The micro-batches of each optimizer step, as lists."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accumulation_steps:
            yield group
            group = []


def lr_at(step, total, warmup, peak):
    """Linear warmup, then cosine from peak down to peak/10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak / 10 + 0.5 * (peak - peak / 10) * (1 + math.cos(math.pi * progress))


# =========================================================================== one step
def optimizer_step(run: Run, model, optimizer, micro_batches, lr, grad_clip):
    """Forward and backward every micro-batch, then one AdamW step. Returns (the step's mean
    loss over all ranks, gradient norm).

    The model divides each micro-batch's summed loss by this rank's share of the step's target
    count, so micro-batches and ranks add up (DDP averages gradients over ranks) to exactly
    the mean over the whole step: N processes or N accumulation steps train like one big batch.
    """
    n_targets = all_reduce_sum(sum(count_targets(b["labels"]) for b in micro_batches).float().to(run.device))
    share = n_targets.clamp(min=1) / run.world
    step_loss = torch.zeros((), device=run.device)
    for j, batch in enumerate(micro_batches):
        syncing = run.world == 1 or j == len(micro_batches) - 1
        with contextlib.nullcontext() if syncing else model.no_sync():
            with run.amp:
                loss = model(**model_inputs(batch, run), num_items_in_batch=share).loss
            run.scaler.scale(loss).backward()
        step_loss += loss.detach()
    for group in optimizer.param_groups:
        group["lr"] = lr
    run.scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    run.scaler.step(optimizer)
    run.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum(step_loss) / run.world, grad_norm


def model_inputs(batch, run: Run) -> dict:
    """A collated batch -> the model's keyword arguments, on the device."""
    nb = run.cuda   # pinned memory + non_blocking: the copy overlaps with compute
    if batch["input_ids"].shape[0] == 0:
        # Every sample of this micro-batch was skipped: a no-target pass keeps DDP ranks in step.
        ids = torch.zeros(1, 1, dtype=torch.long, device=run.device)
        return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}
    inputs = {"input_ids": batch["input_ids"].to(run.device, non_blocking=nb),
              "labels": batch["labels"].to(run.device, non_blocking=nb)}
    for key in ("pixel_values", "image_features"):   # pictures, or their cached CLIP features
        if batch[key] is not None:
            inputs[key] = batch[key].to(run.device, non_blocking=nb)
    return inputs


@torch.no_grad()
def validate(run: Run, model, val: TrainingData, max_batches=50) -> float:
    """Mean token loss over (at most `max_batches` micro-batches of) the held-out data."""
    model.eval()
    total, count = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    for i, batch in enumerate(val.loader):
        if i >= max_batches:
            break
        n = count_targets(batch["labels"])
        if not n:   # every record skipped, or nothing to predict: no loss to average in
            continue
        n = n.to(run.device)
        with run.amp:
            total += model(**model_inputs(batch, run)).loss.float() * n
        count += n
    model.train()
    return float(all_reduce_sum(total) / all_reduce_sum(count).clamp(min=1))


# =========================================================================== logging and saving
class StepLogger:
    """Progress bar, periodic log lines, wandb and the loss history saved with the weights."""

    def __init__(self, args, run: Run, progress, total_steps: int):
        self.args, self.run, self.progress, self.total_steps = args, run, progress, total_steps
        self.bar, self.wandb, self.t_start = None, None, time.time()
        self.first_step, self.t_first_step = progress.step, None
        # A bar redrawn in place suits a terminal; written to a file (nohup, a job scheduler) it
        # is one endless line with the loss hidden in it: there, a log line every --log_interval.
        self.log_lines = args.no_progress or not sys.stderr.isatty()
        self._reset_window()
        problem = None
        if args.use_wandb and run.master:
            import wandb

            progress.wandb_id = progress.wandb_id or f"{args.wandb_run_name}-{int(time.time())}"
            try:
                wandb.init(project=args.wandb_project, name=args.wandb_run_name, id=progress.wandb_id,
                           resume="allow", dir=args.out_dir,
                           config={k: v for k, v in vars(args).items() if k != "config"})
                self.wandb = wandb
            except Exception as e:   # not logged in, no network, ...: wandb's own error types
                problem = (f"--use_wandb: wandb could not start ({str(e).splitlines()[0]}); run `wandb login`, "
                           f"or set WANDB_MODE=offline to log locally and `wandb sync` later")
        problem = first_problem_of_all_ranks(run, problem)
        if problem is not None:
            raise ValueError(problem)

    def _reset_window(self):
        self.window_losses, self.window_tokens, self.window_t0 = [], 0, time.time()

    def start_epoch(self, data: TrainingData):
        from tqdm import tqdm

        a, p = self.args, self.progress
        if self.bar is None:
            self.run.info("%s: %d records, %d steps/epoch x %d epoch(s), global batch %d, lr %.2g, %s",
                          a.stage, len(data.dataset), data.steps_per_epoch, a.epochs, data.sampler.step_batch,
                          a.learning_rate, self.run.device)
        self.bar = tqdm(total=data.steps_per_epoch, initial=p.steps_in_epoch,
                        desc=f"{a.stage} epoch {p.epoch + 1}/{a.epochs}", unit="step", dynamic_ncols=True,
                        disable=not self.run.master or self.log_lines)

    def after_step(self, loss, grad_norm, lr, micro_batches, last) -> bool:
        """Count the step; every log_interval steps (and the last) log the window. True if logged."""
        self.bar.update(1)
        if self.t_first_step is None:   # the time left is estimated from the steps after it
            self.t_first_step = time.time()
        self.window_losses.append(loss)   # kept on the device: no sync per step
        self.window_tokens += sum(int(b["attention_mask"].sum()) for b in micro_batches) * self.run.world
        step = self.progress.step
        if step % self.args.log_interval and not last:
            return False
        mean_loss = float(torch.stack(self.window_losses).mean())
        tok_s = self.window_tokens / max(time.time() - self.window_t0, 1e-9)   # recent speed, all ranks
        record = {"step": step, "epoch": self.progress.epoch_of_last_step, "loss": mean_loss, "lr": lr,
                  "grad_norm": float(grad_norm), "tokens_per_s": tok_s}
        self.progress.history.append(record)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        if self.log_lines:
            self.run.info("step %d/%d (epoch %d/%d) loss %.4f lr %.2e %.0f tok/s%s", step, self.total_steps,
                          self.progress.epoch_of_last_step, self.args.epochs, mean_loss, lr, tok_s,
                          self._time_left(step))
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        self._reset_window()
        return True

    def _time_left(self, step: int) -> str:
        timed = step - self.first_step - 1
        if timed < 1 or step >= self.total_steps:
            return ""
        seconds = (time.time() - self.t_first_step) / timed * (self.total_steps - step)
        hours, minutes = divmod(round(seconds / 60), 60)
        return f", {hours}h {minutes:02d}m left" if hours else f", {max(minutes, 1)}m left"

    def validation(self, val_loss):
        self.progress.history.append({"step": self.progress.step, "val_loss": val_loss})
        self.run.info("step %d validation loss %.4f", self.progress.step, val_loss)
        if self.wandb:
            self.wandb.log({"val_loss": val_loss}, step=self.progress.step)

    def end_epoch(self, epoch, data: TrainingData):
        self.bar.close()
        p = self.progress
        ended = "done" if p.epoch != epoch else f"stopped after {p.steps_in_epoch} of {data.steps_per_epoch} steps"
        self.run.info("epoch %d %s. %s", epoch + 1, ended, data.dataset.summary())

    def finish(self):
        a = self.args
        if self.run.master and self.progress.step > self.first_step:   # else nothing new to say
            with atomic_output(a.save_weight + ".history.json") as tmp, open(tmp, "w") as f:
                json.dump(self.progress.history, f)
            plot_path = os.path.splitext(a.save_weight)[0] + "_loss.png"
            if self.progress.history:
                plot_losses(self.progress.history, plot_path, f"{a.config.tag} {a.stage}")
            self.run.info("saved %s (loss curve: %s) in %.1fs", a.save_weight, plot_path, time.time() - self.t_start)
        if self.wandb:
            self.wandb.finish()


def save_checkpoint(args, run: Run, model, optimizer, progress: Progress, total_steps: int, samples: int):
    """The weights (published layout) and the resume state, each written atomically by rank 0.
    Every rank's RNG state goes into the resume file, so each resumes its own stream. A save
    that fails (a full disk) stops every rank with its line."""
    rng = all_gather_objects(rng_state()) if run.world > 1 else [rng_state()]
    problem = None
    if run.master:
        weights = model_state_dict(model)
        try:
            atomic_save(weights, args.save_weight)
            atomic_save({"format": FORMAT, "model": weights, "optimizer": optimizer.state_dict(),
                         "scaler": run.scaler.state_dict(),
                         "rng": rng, "world_size": run.world, "batch_size": args.batch_size,
                         "accumulation_steps": args.accumulation_steps, "seed": args.seed, "samples": samples,
                         "total_steps": total_steps, **progress.to_state()},
                        args.resume_path)
        except CheckpointError as e:
            problem = str(e)
    problem = first_problem_of_all_ranks(run, problem)   # also the barrier: no rank runs ahead of the save
    if problem is not None:
        raise CheckpointError(problem)


def plot_losses(history, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train_points = [h for h in history if "loss" in h]
    val_points = [h for h in history if "val_loss" in h]
    ax.plot([h["step"] for h in train_points], [h["loss"] for h in train_points], label="train")
    if val_points:
        ax.plot([h["step"] for h in val_points], [h["val_loss"] for h in val_points], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# =========================================================================== processes
def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def first_problem_of_all_ranks(run: "Run", problem):
    """The problem of the first rank that has one (None if none has), known to every rank, so
    that all stop together: a rank that stops alone leaves the others a traceback when their
    next collective finds it gone. Costs one small all_reduce when no rank has a problem."""
    if run.world == 1 or all_reduce_sum(torch.tensor(float(problem is not None), device=run.device)) == 0:
        return problem
    return next(p for p in all_gather_objects(problem) if p is not None)


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
