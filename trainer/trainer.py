"""The one trainer behind `1-pretrain_vlm.py` and `2-sft_vlm.py`.

Stages differ only in defaults (data, which checkpoint to start from, what to save, what to
train); everything else - DDP, mixed precision, accumulation, resume, feature cache, logging -
is this file. Run under torchrun for several GPUs (or CPU processes with gloo):

    torchrun --nproc_per_node 2 1-pretrain_vlm.py --epochs 1
"""
import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dataset.vlm_dataset import IGNORE_INDEX, VLMDataset, make_collate
from model.checkpoint import atomic_save, load_weights, model_state_dict, read_state_dict
from model.config import PRESETS, VLMConfig
from model.prompt import load_tokenizer
from model.vision import VisionEncoder
from model.vlm import MiniMindVLM

log = logging.getLogger("minimind_v")


@dataclass(frozen=True)
class Stage:
    name: str            # pretrain | sft | sft_multi: the output is out/{tag}_vlm_{name}.pth
    init_from: str       # what the default starting weights are called
    data_path: str
    images_dir: str
    learning_rate: float
    epochs: int
    freeze_llm: bool     # default for --freeze_llm (pretrain from an LLM: projector only)
    max_images: int


STAGES = {
    "pretrain": Stage("pretrain", "llm", "dataset/pretrain_data.jsonl", "dataset/pretrain_images",
                      4e-4, 4, True, 1),
    "sft": Stage("sft", "vlm_pretrain", "dataset/sft_data.jsonl", "dataset/sft_images",
                 1e-5, 4, False, 1),
    "sft_multi": Stage("sft_multi", "vlm_sft", "dataset/sft_multi_data.jsonl",
                       "dataset/sft_multi_images", 1e-5, 4, False, 4),
}


# --------------------------------------------------------------------------- arguments
def build_parser(stage: str) -> argparse.ArgumentParser:
    s = STAGES[stage]
    p = argparse.ArgumentParser(description=f"MiniMind-V {stage} training")
    add = p.add_argument
    if stage == "sft":
        add("--multi", action="store_true", help="two-image SFT: sft_multi data, starts from the SFT weights")
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=int, default=512, choices=[512, 768], help="model width (512: 27M, 768: 109M)")
    g.add_argument("--n_layers", type=int, default=None, help="default: 8 for dim 512, 16 for dim 768")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named size; overrides --dim")
    g.add_argument("--use_moe", action="store_true")
    g.add_argument("--max_seq_len", type=int, default=640, help="longest sample in tokens (50 per image)")
    g.add_argument("--vision_model", default="./model/vision_model/clip-vit-base-patch32")
    g.add_argument("--init_weight", default=None, help="starting weights, a .pth or an exported folder (default: out/{tag}_" + s.init_from + ".pth)")
    g.add_argument("--from_scratch", action="store_true", help="random LLM + projector (no starting weights)")
    g.add_argument("--save_weight", default=None, help="output weights (default: out/{tag}_vlm_<stage>.pth)")
    g.add_argument("--freeze_llm", action=argparse.BooleanOptionalAction, default=None,
                   help="train the projector only (default: yes in pretrain from an LLM, no otherwise)")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help=f"JSON/JSONL records (default {s.data_path})")
    g.add_argument("--images_path", default=None, help=f"image folder (default {s.images_dir})")
    g.add_argument("--image_prefix", default="", help="prefix of image file names (real SFT data: COCO_train2014_)")
    g.add_argument("--max_images", type=int, default=None, help=f"images per record (default {s.max_images})")
    g.add_argument("--max_turns", type=int, default=None, help="keep the first N exchanges (1 = v1 behaviour)")
    g.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    g.add_argument("--check_data", action="store_true", help="scan the data, report problems, do not train")
    g.add_argument("--group_by_length", action="store_true", help="batch samples of similar length")
    g.add_argument("--cache_features", action="store_true", help="encode each image once, train from the cache")
    g.add_argument("--cache_dir", default=None, help="default: <out_dir>/feature_cache")
    g.add_argument("--val_data", default=None, help="held-out records for a periodic validation loss")
    g.add_argument("--val_images_path", default=None)
    g.add_argument("--val_interval", type=int, default=200)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=s.epochs)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--batch_size", type=int, default=16, help="per process")
    g.add_argument("--learning_rate", type=float, default=s.learning_rate)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--warmup_steps", type=int, default=None, help="default: 1%% of the steps")
    g.add_argument("--accumulation_steps", type=int, default=1)
    g.add_argument("--grad_clip", type=float, default=1.0)
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="autocast dtype on CUDA (CPU always trains in fp32)")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default="out")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--num_workers", type=int, default=4)
    g.add_argument("--log_interval", type=int, default=10)
    g.add_argument("--save_interval", type=int, default=500, help="save weights + resume state every N steps")
    g.add_argument("--resume", action="store_true", help="continue from <save_weight>.resume if it exists")
    g.add_argument("--use_wandb", action="store_true")
    g.add_argument("--wandb_project", default="MiniMind-V")
    g.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
    return p


def resolve(args, stage: str):
    """Fill in the defaults that depend on other flags."""
    if stage == "sft" and getattr(args, "multi", False):
        stage = "sft_multi"
    s = STAGES[stage]
    args.stage = s.name
    preset = args.preset or str(args.dim)
    cfg = VLMConfig.from_preset(preset, use_moe=args.use_moe, vision_model_path=args.vision_model)
    cfg.max_seq_len = max(cfg.max_seq_len, args.max_seq_len)
    if args.n_layers is not None:
        cfg.n_layers = args.n_layers
    args.config = cfg
    tag = cfg.tag
    args.data_path = args.data_path or s.data_path
    args.images_path = args.images_path or s.images_dir
    args.max_images = args.max_images or s.max_images
    args.init_weight = None if args.from_scratch else (args.init_weight or os.path.join(args.out_dir, f"{tag}_{s.init_from}.pth"))
    args.save_weight = args.save_weight or os.path.join(args.out_dir, f"{tag}_vlm_{s.name}.pth")
    args.resume_path = args.save_weight + ".resume"
    if args.freeze_llm is None:
        args.freeze_llm = s.freeze_llm and not args.from_scratch
    args.cache_dir = args.cache_dir or os.path.join(args.out_dir, "feature_cache")
    return args


# --------------------------------------------------------------------------- distributed
def setup_distributed(device_flag):
    """(rank, local_rank, world, device). torchrun sets RANK/WORLD_SIZE; nccl on CUDA, gloo on CPU."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        use_cuda = torch.cuda.is_available() and (device_flag is None or device_flag.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return rank, local, world, torch.device(f"cuda:{local}" if use_cuda else "cpu")
    device = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    return 0, 0, 1, torch.device(device)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# --------------------------------------------------------------------------- data order
class ResumableBatchSampler:
    """Seeded, epoch-dependent batch order shared by every rank, resumable mid-epoch.

    Global batch k of an epoch is perm[k*G:(k+1)*G] with G = batch_size * world_size; rank r
    takes its r-th slice. So N processes see exactly the batches one process with an N times
    larger batch would (DDP parity), and skipping `start_batch` batches resumes exactly.
    `lengths` (optional) groups samples of similar length into the same global batch.
    """

    def __init__(self, n, batch_size, rank=0, world=1, seed=0, lengths=None):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.lengths = lengths
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        G = self.batch_size * self.world
        if self.lengths is not None:
            # Sort within windows of 50 global batches, then shuffle the batches: similar
            # lengths share a batch (less padding) while the order stays random.
            window = 50 * G
            perm = [i for s in range(0, self.n, window)
                    for i in sorted(perm[s:s + window], key=lambda i: -self.lengths[i])]
        batches = [perm[s:s + G] for s in range(0, self.n - G + 1, G)]   # drop the ragged tail
        if self.lengths is not None:
            order = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in order]
        return batches

    def __len__(self):
        return self.n // (self.batch_size * self.world)

    def __iter__(self):
        for batch in self.global_batches()[self.start_batch:]:
            yield batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]


def lr_at(step, total, warmup, peak):
    """Linear warmup, then cosine from peak down to peak/10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak / 10 + 0.5 * (peak - peak / 10) * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- RNG state
def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- the run
class Run:
    def __init__(self, args):
        self.args = args
        self.rank, self.local_rank, self.world, self.device = setup_distributed(args.device)
        self.master = self.rank == 0
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(args.seed + self.rank)
        random.seed(args.seed + self.rank)
        np.random.seed(args.seed + self.rank)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
        # Mixed precision only on CUDA and always with an explicit dtype; the loss scaler is
        # for fp16 alone (bf16 has fp32's range and needs none).
        self.amp = (torch.autocast("cuda", dtype=dtype) if self.cuda and dtype != torch.float32
                    else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda and dtype == torch.float16)

    def info(self, msg, *a):
        if self.master:
            log.info(msg, *a)

    # ---- set-up ------------------------------------------------------------------------------
    def build_model(self):
        a = self.args
        encoder = VisionEncoder.from_pretrained(a.vision_model, layer=a.config.vision_layer,
                                                squash=a.config.squash_images)
        a.config.vision_hidden_size = encoder.hidden_size
        model = MiniMindVLM(a.config, encoder)
        if a.init_weight:
            if not os.path.exists(a.init_weight):   # a .pth file or an exported folder
                hint = ("download MiniMind's full_sft_{dim}.pth and save it under that name, or pass "
                        "--from_scratch" if a.stage == "pretrain" else
                        f"run the previous stage first, or pass --init_weight")
                raise SystemExit(f"error: starting weights {a.init_weight} not found: {hint}")
            kind = load_weights(model, a.init_weight)
            self.info("loaded %s weights from %s", kind, a.init_weight)
        for name, p in model.named_parameters():
            p.requires_grad = not a.freeze_llm or name.startswith("vision_proj.")
        model.to(self.device)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        self.info("model %s: %.2fM parameters, %.2fM trainable%s", a.config.tag, n_all / 1e6, n_train / 1e6,
                  " (projector only)" if a.freeze_llm else "")
        self.model = model
        self.ddp_model = model
        if self.world > 1:
            # find_unused_parameters: an image-free batch leaves the projector (and MoE a
            # quiet expert) out of the graph, which plain DDP would wait for forever.
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.local_rank] if self.cuda else None, find_unused_parameters=True)
        return model

    def build_data(self, data_path, images_path, tokenizer):
        a = self.args
        ds = VLMDataset(data_path, images_path, tokenizer, a.config.image_ids, max_seq_len=a.max_seq_len,
                        max_turns=a.max_turns, image_prefix=a.image_prefix, max_images=a.max_images,
                        strict=a.strict, image_mode="paths" if a.cache_features else "pixels",
                        preprocess=self.model.vision_encoder.preprocess)
        if a.cache_features:
            from trainer.feature_cache import FeatureCache

            if not hasattr(self, "cache"):
                self.cache = FeatureCache(a.cache_dir, self.model.vision_encoder)
            bad = self.cache.build([p for s in ds.samples for p in s[3]], self.device,
                                   num_workers=a.num_workers, rank=self.rank, world_size=self.world,
                                   barrier=barrier, progress=self.master and not a.no_progress)
            ds.drop_images(bad)
        return ds

    def loader(self, ds, sampler):
        a = self.args
        return torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, collate_fn=make_collate(pad_id=0), num_workers=a.num_workers,
            pin_memory=self.cuda, persistent_workers=False, prefetch_factor=4 if a.num_workers else None)

    # ---- one micro-step ------------------------------------------------------------------------
    def to_device(self, batch):
        nb = self.cuda   # pinned memory + non_blocking: the copy overlaps with compute
        ids = batch["input_ids"].to(self.device, non_blocking=nb)
        labels = batch["labels"].to(self.device, non_blocking=nb)
        vision = {"images_per_sample": batch["images_per_sample"]}
        if self.args.cache_features:
            feats = self.cache.lookup(batch["image_paths"])
            if feats is not None:
                vision["image_features"] = feats.to(self.device, non_blocking=nb)
        elif batch["pixel_values"] is not None:
            vision["pixel_values"] = batch["pixel_values"].to(self.device, non_blocking=nb)
        return ids, labels, vision

    def loss_terms(self, model, batch):
        """(sum of token cross entropies, MoE aux loss) of one micro-batch on this rank."""
        ids, labels, vision = self.to_device(batch)
        if ids.shape[0] == 0:    # every sample of this micro-batch was skipped: stay in step
            ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            labels = torch.full_like(ids, IGNORE_INDEX)
            vision = {}
        with self.amp:
            out = model(ids, labels=labels, **vision)
        return out.ce_sum, out.aux_loss

    # ---- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, val_loader, max_batches=50):
        self.model.eval()
        total, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for i, batch in enumerate(val_loader):
            if i >= max_batches:
                break
            total += self.loss_terms(self.model, batch)[0]
            count += label_tokens(batch)
        total, count = all_reduce_sum(total), all_reduce_sum(count)
        self.model.train()
        return (total / count.clamp(min=1)).item()


def label_tokens(batch) -> torch.Tensor:
    """How many tokens of this micro-batch the loss counts (labels are shifted by one)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()


def step_groups(loader, accumulation_steps):
    """The micro-batches of each optimizer step, as lists (the last one may be shorter)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accumulation_steps:
            yield group
            group = []
    if group:
        yield group


def save_checkpoint(run, optimizer, step, epoch, batch_in_epoch, history, wandb_id):
    a = run.args
    atomic_save(model_state_dict(run.model), a.save_weight)
    atomic_save({"model": model_state_dict(run.model), "optimizer": optimizer.state_dict(),
                 "scaler": run.scaler.state_dict(), "step": step, "epoch": epoch,
                 "batch_in_epoch": batch_in_epoch, "rng": run.rng_all, "history": history,
                 "wandb_id": wandb_id, "world_size": run.world, "batch_size": a.batch_size,
                 "seed": a.seed}, a.resume_path)


def plot_losses(history, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_loss" in h]
    ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train")
    if val:
        ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def train(args):
    run = Run(args)
    a = args
    if run.master:
        os.makedirs(a.out_dir, exist_ok=True)
    tokenizer = load_tokenizer()
    if not os.path.isfile(a.data_path):
        raise SystemExit(f"error: data file {a.data_path} not found (see README: Data)")
    if a.check_data:
        from scripts.check_data import scan

        checked = scan(a.data_path, a.images_path, image_prefix=a.image_prefix, max_seq_len=a.max_seq_len,
                       max_images=a.max_images, max_turns=a.max_turns, tokenizer=tokenizer,
                       image_ids=a.config.image_ids, progress=not a.no_progress)
        print(checked.summary())
        return 1 if checked.problems else 0
    model = run.build_model()
    ds = run.build_data(a.data_path, a.images_path, tokenizer)
    run.info("%s", ds.summary())
    if len(ds) < a.batch_size * run.world:
        raise SystemExit(f"error: {a.data_path} has {len(ds)} usable records, fewer than one global "
                         f"batch ({a.batch_size} x {run.world} processes)")
    sampler = ResumableBatchSampler(len(ds), a.batch_size, run.rank, run.world, a.seed,
                                    ds.approx_lengths if a.group_by_length else None)
    loader = run.loader(ds, sampler)
    val_loader = None
    if a.val_data:
        val_ds = run.build_data(a.val_data, a.val_images_path or a.images_path, tokenizer)
        val_sampler = ResumableBatchSampler(len(val_ds), a.batch_size, run.rank, run.world, a.seed)
        val_loader = run.loader(val_ds, val_sampler)

    steps_per_epoch = math.ceil(len(sampler) / a.accumulation_steps)
    total_steps = steps_per_epoch * a.epochs
    if a.max_steps:
        total_steps = min(total_steps, a.max_steps)
    warmup = a.warmup_steps if a.warmup_steps is not None else max(1, total_steps // 100)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.learning_rate, weight_decay=a.weight_decay,
                                  betas=(0.9, 0.95), fused=run.cuda or None)

    step, start_epoch, start_batch, history, wandb_id = 0, 0, 0, [], None
    if a.resume and os.path.isfile(a.resume_path):
        state = torch.load(a.resume_path, map_location="cpu", weights_only=False)
        if (state["world_size"], state["batch_size"]) != (run.world, a.batch_size):
            raise SystemExit(f"error: {a.resume_path} was written by {state['world_size']} process(es) with "
                             f"batch {state['batch_size']}; resume with the same settings")
        load_weights(model, state["model"], name=a.resume_path)
        optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        step, start_epoch, start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        history, wandb_id = state["history"], state["wandb_id"]
        set_rng_state(state["rng"][run.rank])
        run.info("resumed from %s at step %d (epoch %d, batch %d)", a.resume_path, step, start_epoch + 1, start_batch)
    elif a.resume:
        run.info("no resume file at %s: starting fresh", a.resume_path)

    wandb = None
    if a.use_wandb and run.master:
        import wandb

        wandb_id = wandb_id or f"{a.config.tag}-{a.stage}-{int(time.time())}"
        wandb.init(project=a.wandb_project, name=f"{a.config.tag}_vlm_{a.stage}", id=wandb_id, resume="allow",
                   dir=a.out_dir, config={k: v for k, v in vars(a).items() if k != "config"})

    run.info("%s: %d records, %d steps/epoch x %d epoch(s), global batch %d, lr %.2g, %s",
             a.stage, len(ds), steps_per_epoch, a.epochs, a.batch_size * run.world * a.accumulation_steps,
             a.learning_rate, run.device)
    from tqdm import tqdm

    model.train()
    t_start, done = time.time(), step >= total_steps
    for epoch in range(start_epoch, a.epochs):
        if done:
            break
        consumed = start_batch if epoch == start_epoch else 0    # micro-batches of this epoch
        sampler.set_epoch(epoch, consumed)
        skipped_epoch = 0
        bar = tqdm(total=len(sampler), initial=consumed, desc=f"{a.stage} epoch {epoch + 1}/{a.epochs}",
                   disable=not run.master or a.no_progress, dynamic_ncols=True, unit="batch")
        window_loss, window_tok, window_t0, window_tokens = torch.zeros((), device=run.device), 0.0, time.time(), 0
        for group in step_groups(loader, a.accumulation_steps):
            for ref, reason in (s for batch in group for s in batch["skipped"]):
                ds.report(ref, reason)
                skipped_epoch += 1
            # The step's loss is the token mean over ALL its micro-batches on ALL ranks, so
            # accumulation and N processes give exactly the gradient of one big batch.
            n_tok = all_reduce_sum(sum(label_tokens(b) for b in group).to(run.device)).clamp(min=1)
            for j, batch in enumerate(group):
                last_micro = j == len(group) - 1
                ctx = run.ddp_model.no_sync() if run.world > 1 and not last_micro else contextlib.nullcontext()
                with ctx:
                    ce_sum, aux = run.loss_terms(run.ddp_model, batch)
                    # DDP averages gradients over ranks, hence the factor world.
                    loss = ce_sum * run.world / n_tok + aux / len(group)
                    run.scaler.scale(loss).backward()
                window_loss += ce_sum.detach()      # summed on the device: no sync per micro-step
                window_tokens += int(batch["attention_mask"].sum()) * run.world
            window_tok += float(n_tok)
            consumed += len(group)
            bar.update(len(group))

            lr = lr_at(step, total_steps, warmup, a.learning_rate)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            run.scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
            run.scaler.step(optimizer)
            run.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last = step >= total_steps
            if step % a.log_interval == 0 or last:
                mean_loss = float(all_reduce_sum(window_loss) / window_tok)
                tok_s = window_tokens / max(time.time() - window_t0, 1e-9)   # recent speed, all ranks
                history.append({"step": step, "epoch": epoch + 1, "loss": mean_loss, "lr": lr,
                                "grad_norm": float(grad_norm), "tokens_per_s": tok_s})
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                if a.no_progress:
                    run.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step, total_steps, mean_loss, lr, tok_s)
                if wandb:
                    wandb.log({"loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm),
                               "tokens_per_s": tok_s, "epoch": epoch + 1}, step=step)
                window_loss, window_tok, window_t0, window_tokens = torch.zeros((), device=run.device), 0.0, time.time(), 0
            if val_loader is not None and (step % a.val_interval == 0 or last):
                val_loss = run.validate(val_loader)
                history.append({"step": step, "val_loss": val_loss})
                run.info("step %d validation loss %.4f", step, val_loss)
                if wandb:
                    wandb.log({"val_loss": val_loss}, step=step)
            epoch_done = consumed == len(sampler)
            if step % a.save_interval == 0 or last or epoch_done:
                run.rng_all = gather_rng(run)
                if run.master:
                    position = (epoch + 1, 0) if epoch_done else (epoch, consumed)
                    save_checkpoint(run, optimizer, step, *position, history, wandb_id)
                barrier()
            if last:
                done = True
                break
        bar.close()
        run.info("epoch %d done: %d sample(s) skipped this epoch; %s", epoch + 1, skipped_epoch, ds.summary())
    if run.master:
        with open(a.save_weight + ".history.json", "w") as f:
            json.dump(history, f)
        plot_path = os.path.splitext(a.save_weight)[0] + "_loss.png"
        if history:
            plot_losses(history, plot_path, f"{a.config.tag} {a.stage}")
        run.info("saved %s (loss curve: %s) in %.1fs", a.save_weight, plot_path, time.time() - t_start)
    if wandb:
        wandb.finish()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def gather_rng(run):
    """Every rank's RNG state (rank 0 saves them all, so each rank resumes its own stream)."""
    state = rng_state()
    if run.world == 1:
        return [state]
    states = [None] * run.world
    dist.all_gather_object(states, state)
    return states


def main(stage: str, argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = resolve(build_parser(stage).parse_args(argv), stage)
    try:
        sys.exit(train(args))
    except (FileNotFoundError, ValueError) as e:
        # User errors (missing folders, bad checkpoints, bad data under --strict): one line.
        raise SystemExit(f"error: {e}")
