"""Training throughput of MiniMind-V (512x8 decoder + CLIP ViT-B/32): our trainer's step against
the step of the ORIGINAL MiniMind-V v1 training loop.

    python bench/bench_train.py                              # ~2-4 minutes on a 2-core CPU
    python bench/bench_train.py --steps 1 --samples 16       # smoke run (CI)
    python bench/bench_train.py --device cuda                # bf16 autocast, MFU
    python bench/bench_train.py --compile                    # our rows with compiled blocks (--compile)

One JSON object on stdout, progress on stderr. Four rows, on the same random weights, timed over
the same batches of the same synthetic samples:

    v1_original                  the v1 step (below): everything trained, CLIP run live
    ours_live_all_trained        our trainer's step, everything trained, CLIP run live
    ours_cached_all_trained      the same from cached CLIP features (fp16 [N, 50, 768], the
                                 format of trainer/feature_cache.py)
    ours_default_projector_only  our pretrain default (--freeze_llm: only vision_proj trains),
                                 cached features

Samples look like v1 pretrain records: `<s>user\\n` + one picture (the 50-token placeholder) +
a question of 8-16 tokens, then `<s>assistant\\n` + a caption of 20-40 tokens + `</s>\\n`
(random token ids from a fixed seed; pictures are seeded random pixels). Each row's first step
(batch 0) is an untimed warm-up; timed step k uses batch k+1, so each timed step sees other
samples. The rows take turns step by step: on a shared machine a burst of load from other jobs
then slows all rows alike (the JSON gives the mean 1-minute load average seen by each row).
Everything a DataLoader worker would do (tokenizing, padding, preprocessing pictures, reading
the cache) is done before the clock starts, for every row; so is logging.

Our step is the body of `trainer.trainer.optimizer_step` for one process and one micro-batch:
`model(**inputs, num_items_in_batch=...)` under the trainer's autocast (`start_run`), the
trainer's scaler, gradient clipping at 1.0 and `configure_optimizer`'s AdamW.

THE v1 BASELINE (`V1Step`) re-does, with its own code, what one step of v1's pretraining did.
Source: github.com/jingyaogong/minimind-v at 3cc902b (2024-11-19), the last commit of v1
(MiniMind2-V replaced the code on 2025-02-20); v1 pinned torch 2.1.2 / transformers 4.44.0, the
bench runs both loops on today's versions. It reads our parameters (the weights are the same
tensors) but calls none of our forward code, so speeding ours up cannot speed it up.
Reproduced, with where v1 did it:

 1. Every sample padded to max_seq_len 512, the model fed X = ids[:-1] and Y = ids[1:], 511
    positions, padding id 0. [model/LMConfig.py LMConfig (max_seq_len=512);
    1-pretrain_vlm.py __main__ (PretrainDataset(max_length=max_seq_len));
    model/dataset.py PretrainDataset.__getitem__]
 2. Loss mask: 0 up to the end of the last `<s>assistant`, 1 from there to the end of the
    sample (the newline, the caption, `</s>`, the final newline), 0 on padding; shifted like Y.
    [model/dataset.py PretrainDataset.__getitem__ (find_sublist_index of '<s>assistant')]
 3. Batches [B, 1, 3, 224, 224]: one processor output per sample, collated by the DataLoader
    with pin_memory=True; each tensor moved with a plain blocking .to(device).
    [model/vision_utils.py get_img_process; 1-pretrain_vlm.py __main__ (DataLoader) and
    train_epoch (X.to(args.device), ...)]
 4. CLIP picture by picture: for each sample, the full CLIPModel.get_image_features on
    [1, 3, 224, 224] (vision tower, post-layernorm and the 768->512 visual projection of the
    pooled token, whose result v1 threw away), the features taken by a forward hook on
    vision_model.encoder (last_hidden_state), stacked to [B, 1, 50, 768] and squeeze()d; under
    no_grad, in fp32 (called before the autocast context, so fp32 on CUDA too). 5-D input,
    so get_img_embedding's unsqueeze(0) does not fire in training.
    [model/vision_utils.py get_vision_model (CLIPModel), get_img_embedding;
    1-pretrain_vlm.py train_epoch]
 5. Placeholder search: unfold + compare against torch.tensor(image_ids) built and copied to
    the device every forward, then per row nonzero() and two .item() per match (host syncs).
    [model/model.py Transformer.count_vision_proj.find_indices]
 6. Projection Linear(768, dim) WITH a bias (nn.Linear's default; ours has none, so the
    baseline adds a trainable zero bias), unsqueeze(1) to [B, 1, 50, dim]; splice per row as
    h[i] = torch.cat((before, picture, after))[:seqlen] written into h, then torch.stack.
    [model/model.py VisionProj, Transformer.count_vision_proj]
 7. Dropout(0.0) modules still called: after the splice, after wo, after the FFN.
    [model/model.py Transformer.forward, Attention.forward, FeedForward.forward]
 8. RMSNorm as x.float() * rsqrt(mean(x^2) + eps), type_as(x), then * weight.
    [model/model.py RMSNorm]
 9. RoPE: a complex64 table from torch.polar over max_seq_len, q and k each rotated by
    view_as_complex(x.float()) * table, view_as_real, type_as. [model/model.py
    precompute_pos_cis, apply_rotary_emb]
10. Attention: repeat_kv materialises the 8 key/value heads as 16 (expand + reshape), then
    scaled_dot_product_attention(is_causal=True) on transposed views (flash_attn=True and
    seqlen != 1), output .transpose(1, 2).contiguous().view(). [model/model.py
    repeat_kv, Attention.forward; LMConfig flash_attn=True]
11. SwiGLU w2(silu(w1 x) * w3 x); residual blocks h = x + attn(norm(x)); out = h + ffn(norm(h)).
    [model/model.py FeedForward, TransformerBlock]
12. Logits for all 511 positions through the tied 6400-word output matrix, and the
    cross-entropy computed TWICE: once inside the model's forward (targets given: reduction
    'none', ignore_index=0, kept in the model's output object until the next forward) and
    again in the loop, then sum(loss * mask) / mask.sum(). [model/model.py Transformer.__init__
    (tok_embeddings.weight = output.weight), Transformer.forward (self.last_loss, self.OUT);
    1-pretrain_vlm.py train_epoch]
13. Mixed precision: CPU none; CUDA torch.cuda.amp.autocast() with no dtype, i.e. fp16 whatever
    --dtype says, plus a GradScaler that is enabled (scale, unscale_, step, update: one host
    sync per step). On a machine without CUDA that GradScaler disables itself.
    [1-pretrain_vlm.py __main__ (ctx, scaler)]
14. Everything trains: torch.optim.Adam(model.parameters(), lr=4e-4), no weight decay, default
    implementation (not fused; foreach on CUDA); no parameter frozen (the freezing loop was
    commented out in the first release, 47a3bb9, and later deleted).
    [1-pretrain_vlm.py __main__ (optimizer), init_model]
15. Per step: lr written into the param groups, clip_grad_norm_(model.parameters(), 1.0) after
    scaler.unscale_, scaler.step, scaler.update, zero_grad(set_to_none=True); the loss is not
    divided by accumulation_steps (default 1, as here). [1-pretrain_vlm.py train_epoch]
Left out of both loops: data loading (see above), logging (v1: loss.item() every 10 steps),
checkpoints, DDP.

GEMM FRACTION. `gemm_peak_gflops` is a measured big matmul (fp32 2048^3 on CPU, bf16 8192^3 on
CUDA, best of 5, same thread count). For the cached rows `useful_gflops` counts the matmuls
the step needs, over real tokens only, divided by the step time; the exact rule is printed in
the JSON as `useful_gflops_counting`; `gemm_fraction` = useful / peak. On CUDA, `mfu` divides
the same useful FLOP/s by --peak_tflops (the data-sheet dense bf16 peak, 989 for an H100 SXM).
What the step's shapes allow: each cached row then runs once more on each of the first 3 timed
batches (untimed) with every matrix multiply it dispatches recorded (forward and backward: op,
shapes, strides, dtype), and those same calls are timed again back to back on random operands,
with nothing between them (best of 2 after a warm-up pass). `matmuls_alone_gemm_fraction` is
the useful FLOPs over that time, as a fraction of the peak: the GEMM fraction the step would
reach if everything but its matmuls cost nothing. `matmuls_alone_share_of_step` is that time
over those batches' timed steps.
Peak memory per row: what a process running that row alone would need: the assets all rows
share (CLIP, the decoder, the samples) plus the row's own peak increase over its first step
(optimizer state, activations, gradients): torch.cuda.max_memory_allocated on CUDA, on CPU the
peak RSS (resource.getrusage, its high-water mark reset through /proc/self/clear_refs).
"""
import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from machine import add_device_argument, cpu_name  # same folder

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.config import IGNORE_INDEX, VLMConfig  # noqa: E402
from model.language import count_targets  # noqa: E402
from model.vision import VisionEncoder, clip_processor_class  # noqa: E402
from model.vlm import MiniMindVLM  # noqa: E402

ROWS = ("v1_original", "ours_live_all_trained", "ours_cached_all_trained", "ours_default_projector_only")
CACHED_ROWS = ("ours_cached_all_trained", "ours_default_projector_only")
LEARNING_RATE = 4e-4          # the pretrain learning rate of v1 and of ours (a constant here)
GRAD_CLIP = 1.0               # v1's default and ours
MATMULS_ALONE_BATCHES = 3     # timed batches whose matmuls are also run alone (see measure_matmuls_alone)
PICTURE_SIZE = 224

# Token ids of the MiniMind chat template (the tokenizer of model/minimind_tokenizer).
USER_HEADER = [1, 320, 275, 201]               # "<s>user\n"
END_OF_TURN = [2, 201]                         # "</s>\n"
ASSISTANT_HEADER = [1, 1078, 538, 501, 201]    # "<s>assistant\n"
NEWLINE = 201
EOS = 2

V1_MAX_SEQ_LEN = 512
V1_PAD_ID = 0
V1_ANSWER_MARK = [1, 1078, 538, 501]           # tokenizer('<s>assistant'): v1's `bos_id`
V1_CLIP_PROJECTION_DIM = 512                   # CLIPModel.visual_projection of ViT-B/32


STARTED = time.perf_counter()


def log(message):
    print(f"[bench_train {time.perf_counter() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def random_clip_b32() -> VisionEncoder:
    """A randomly initialised CLIP ViT-B/32 vision tower (also used by bench_generate.py)."""
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    # CLIPVisionConfig's defaults are ViT-B/32 at 224 px: 12 layers, width 768, 50 tokens.
    return VisionEncoder(CLIPVisionModel(CLIPVisionConfig(image_size=PICTURE_SIZE, patch_size=32)).eval(),
                         clip_processor_class()())


# =========================================================================== the samples
@dataclass
class Sample:
    index: int
    ids: List[int]       # the whole conversation, as our dataset tokenizes it
    labels: List[int]    # ours: aligned with ids (HF convention), IGNORE_INDEX where no target

    def picture(self) -> torch.Tensor:
        """Normalised pixels [3, 224, 224]: the same for every row, drawn from the sample's index."""
        g = torch.Generator().manual_seed(10_000 + self.index)
        return torch.randn(3, PICTURE_SIZE, PICTURE_SIZE, generator=g)


def build_samples(n: int, image_ids: List[int], seed: int = 0) -> List[Sample]:
    """Caption records like v1's pretrain data: a question and one picture, a 20-40 token caption.
    The answer's `</s>` is a target for us, the template's newline after it is not
    (model/prompt.py encode_conversation)."""
    g = torch.Generator().manual_seed(seed)

    def words(shortest, longest):
        n_tokens = int(torch.randint(shortest, longest + 1, (1,), generator=g))
        # Ordinary vocabulary: above the special tokens and the `<` / `>` of the placeholder.
        return torch.randint(300, 6400, (n_tokens,), generator=g).tolist()

    samples = []
    for i in range(n):
        prompt = USER_HEADER + list(image_ids) + [NEWLINE] + words(8, 16) + END_OF_TURN + ASSISTANT_HEADER
        caption = words(20, 40)
        ids = prompt + caption + END_OF_TURN
        labels = [IGNORE_INDEX] * len(prompt) + caption + [EOS] + [IGNORE_INDEX]
        samples.append(Sample(i, ids, labels))
    return samples


def pinned(batch: dict, device: torch.device) -> dict:
    """What DataLoader(pin_memory=True) hands over on CUDA (v1's loader pinned too)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# =========================================================================== the v1 baseline
def v1_collate(samples: List[Sample], device: torch.device) -> dict:
    """What v1's PretrainDataset + DataLoader produced for these samples (see the docstring, 1-3)."""
    xs, ys, masks, pictures = [], [], [], []
    for s in samples:
        ids = s.ids[:V1_MAX_SEQ_LEN]
        mark = len(V1_ANSWER_MARK)
        answer_start = max(i for i in range(len(ids) - mark + 1) if ids[i:i + mark] == V1_ANSWER_MARK) + mark
        padding = V1_MAX_SEQ_LEN - len(ids)
        loss_mask = [0] * answer_start + [1] * (len(ids) - answer_start) + [0] * padding
        ids = ids + [V1_PAD_ID] * padding
        xs.append(ids[:-1])
        ys.append(ids[1:])
        masks.append(loss_mask[1:])
        pictures.append(s.picture()[None])                 # the processor's [1, 3, 224, 224]
    return pinned({"X": torch.tensor(xs), "Y": torch.tensor(ys), "loss_mask": torch.tensor(masks),
                   "pixel_values": torch.stack(pictures)}, device)


def v1_rms_norm(x, weight, eps):
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def v1_rotary(xq, xk, pos_cis):
    q = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    k = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    table = pos_cis.view(1, q.shape[1], 1, q.shape[-1])
    return (torch.view_as_real(q * table).flatten(3).type_as(xq),
            torch.view_as_real(k * table).flatten(3).type_as(xk))


def v1_repeat_kv(x, n_rep):
    batch, length, n_kv, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(batch, length, n_kv, n_rep, head_dim).reshape(
        batch, length, n_kv * n_rep, head_dim)


class V1Step:
    """One step of v1's pretraining (module docstring, 1-15), on the weights of `model`."""

    def __init__(self, model: MiniMindVLM, device: torch.device):
        self.model, self.device, self.cfg = model, device, model.config
        cfg = self.cfg
        # v1's projector was nn.Linear(768, dim): a bias ours does not have.
        self.vision_proj_bias = nn.Parameter(torch.zeros(cfg.dim, device=device))
        self.clip = model.vision_encoder.clip
        self.clip_tower = getattr(self.clip, "vision_model", self.clip)   # transformers 4 nests it
        # get_image_features ends with CLIPModel.visual_projection (768 -> 512, no bias); CLIPVisionModel
        # has none, so a frozen random one stands in for it.
        self.clip_visual_projection = nn.Linear(self.clip.config.hidden_size, V1_CLIP_PROJECTION_DIM,
                                                bias=False).to(device).requires_grad_(False)
        freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2)[: cfg.head_dim // 2].float()
                                          / cfg.head_dim))
        angles = torch.outer(torch.arange(V1_MAX_SEQ_LEN).float(), freqs)
        self.pos_cis = torch.polar(torch.ones_like(angles), angles).to(device)
        self.image_ids = list(cfg.image_ids)
        self.params = list(model.parameters()) + [self.vision_proj_bias]
        self.activate()
        self.optimizer = torch.optim.Adam(self.params, lr=LEARNING_RATE)
        cuda = device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda)
        self.loss_kept_by_model_output = None    # v1's self.OUT held the forward's own CE graph

    def activate(self):
        """v1 trained every parameter (the rows share the decoder's tensors: each sets its own flags)."""
        for p in self.params:
            p.requires_grad_(True)

    def collate(self, samples):
        return v1_collate(samples, self.device)

    def __call__(self, batch: dict) -> torch.Tensor:
        X = batch["X"].to(self.device)
        Y = batch["Y"].to(self.device)
        loss_mask = batch["loss_mask"].to(self.device)
        pixel_values = batch["pixel_values"].to(self.device)
        image_features = self.clip_features(pixel_values)
        for group in self.optimizer.param_groups:
            group["lr"] = LEARNING_RATE
        with self.autocast:
            logits, self.loss_kept_by_model_output = self.forward(X, Y, image_features)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1), ignore_index=V1_PAD_ID,
                                   reduction="none")
            loss_mask = loss_mask.view(-1)
            loss = torch.sum(loss * loss_mask) / loss_mask.sum()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def clip_features(self, pixel_values):
        captured = []

        def keep_encoder_output(module, inputs, output):
            captured.append(output.last_hidden_state)

        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(0)
        hook = self.clip_tower.encoder.register_forward_hook(keep_encoder_output)
        for i in range(pixel_values.size(0)):
            pooled = self.clip(pixel_values=pixel_values[i]).pooler_output
            self.clip_visual_projection(pooled)          # get_image_features' return value, unused
        hook.remove()
        return torch.stack(captured, dim=0).squeeze()    # [B, 50, 768]

    def forward(self, tokens, targets, image_features):
        m, cfg = self.model, self.cfg
        seqlen = tokens.shape[1]
        h = F.embedding(tokens, m.tok_embeddings.weight)
        h = self.splice_pictures(tokens, h, image_features, seqlen)
        h = F.dropout(h, cfg.dropout, training=True)
        pos_cis = self.pos_cis[:seqlen]
        for layer in m.layers:
            h = self.block(layer, h, pos_cis)
        h = v1_rms_norm(h, m.norm.weight, cfg.norm_eps)
        logits = F.linear(h, m.output.weight)                 # every position
        model_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=V1_PAD_ID,
                                     reduction="none")
        return logits, model_loss

    def splice_pictures(self, tokens, h, image_features, seqlen):
        image_ids = torch.tensor(self.image_ids).to(tokens.device)
        span = len(self.image_ids)
        if span > tokens.size(1):
            return h
        matches = (tokens.unfold(1, span, 1) == image_ids).all(dim=2)
        spans = {}
        for row in range(tokens.size(0)):
            starts = matches[row].nonzero(as_tuple=True)[0]
            if starts.numel() > 0:
                spans[row] = [(i.item(), i.item() + span - 1) for i in starts]
        if image_features is None:
            return h
        pictures = F.linear(image_features, self.model.vision_proj.vision_proj[0].weight, self.vision_proj_bias)
        pictures = pictures.unsqueeze(1) if pictures.dim() == 3 else pictures
        if not spans:
            return h
        rows = []
        for row in range(h.size(0)):
            for k, (start, end) in enumerate(spans.get(row, [])):
                h[row] = torch.cat((h[row][:start, :], pictures[row][k], h[row][end + 1:, :]), dim=0)[:seqlen]
            rows.append(h[row])
        return torch.stack(rows, dim=0)

    def block(self, layer, x, pos_cis):
        eps = self.cfg.norm_eps
        h = x + self.attention(layer.attention, v1_rms_norm(x, layer.attention_norm.weight, eps), pos_cis)
        return h + self.feed_forward(layer.feed_forward, v1_rms_norm(h, layer.ffn_norm.weight, eps))

    def attention(self, attn, x, pos_cis):
        cfg = self.cfg
        batch, seqlen, _ = x.shape
        xq = F.linear(x, attn.wq.weight).view(batch, seqlen, cfg.n_heads, cfg.head_dim)
        xk = F.linear(x, attn.wk.weight).view(batch, seqlen, cfg.n_kv_heads, cfg.head_dim)
        xv = F.linear(x, attn.wv.weight).view(batch, seqlen, cfg.n_kv_heads, cfg.head_dim)
        xq, xk = v1_rotary(xq, xk, pos_cis)
        n_rep = cfg.n_heads // cfg.n_kv_heads
        xk, xv = v1_repeat_kv(xk, n_rep), v1_repeat_kv(xv, n_rep)
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        out = F.scaled_dot_product_attention(xq, xk, xv, attn_mask=None, dropout_p=cfg.dropout, is_causal=True)
        out = out.transpose(1, 2).contiguous().view(batch, seqlen, -1)
        return F.dropout(F.linear(out, attn.wo.weight), cfg.dropout, training=True)

    def feed_forward(self, ff, x):
        hidden = F.silu(F.linear(x, ff.w1.weight)) * F.linear(x, ff.w3.weight)
        return F.dropout(F.linear(hidden, ff.w2.weight), self.cfg.dropout, training=True)


# =========================================================================== our trainer's step
class OursStep:
    """`trainer.trainer.optimizer_step` for one process and one micro-batch, with the trainer's
    Run (autocast, scaler) and optimizer; `features` selects cached CLIP features over live CLIP."""

    def __init__(self, model: MiniMindVLM, device: torch.device, train_llm: bool, features: dict = None):
        from trainer.trainer import start_run   # here, so bench_generate's import stays light

        self.run = start_run(argparse.Namespace(device=str(device), seed=0,
                                                dtype="bfloat16" if device.type == "cuda" else "float32"))
        self.model, self.device, self.features, self.train_llm = model, device, features, train_llm
        self.activate()
        self.optimizer = model.configure_optimizer(0.01, LEARNING_RATE, betas=(0.9, 0.95))
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def activate(self):
        for name, p in self.model.named_parameters():       # as trainer.build_model does
            p.requires_grad_(self.train_llm or name.startswith("vision_proj."))

    def collate(self, samples: List[Sample]) -> dict:
        """dataset.vlm_dataset.collate's output: right padding to the longest sample."""
        longest = max(len(s.ids) for s in samples)
        input_ids = torch.zeros(len(samples), longest, dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        for b, s in enumerate(samples):
            input_ids[b, :len(s.ids)] = torch.tensor(s.ids)
            labels[b, :len(s.labels)] = torch.tensor(s.labels)
        batch = {"input_ids": input_ids, "labels": labels}
        if self.features is not None:
            batch["image_features"] = torch.stack([self.features[s.index] for s in samples])   # fp16
        else:
            batch["pixel_values"] = torch.stack([s.picture() for s in samples])
        return pinned(batch, self.device)

    def __call__(self, batch: dict) -> torch.Tensor:
        run = self.run
        share = count_targets(batch["labels"]).float().to(run.device).clamp(min=1)
        inputs = {k: v.to(run.device, non_blocking=run.cuda) for k, v in batch.items()}
        with run.amp:
            loss = self.model(**inputs, num_items_in_batch=share).loss
        run.scaler.scale(loss).backward()
        for group in self.optimizer.param_groups:
            group["lr"] = LEARNING_RATE
        run.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        run.scaler.step(self.optimizer)
        run.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# =========================================================================== FLOPs and memory
USEFUL_FLOPS_RULE = (
    "FLOPs of the weight matmuls the step needs, over REAL tokens only (padding, which ours "
    "pads to the batch's longest sample and v1 to 511, counts as waste): forward 2, gradient of "
    "the input 2, gradient of the weight 2 (x parameters x tokens), the last only for trained "
    "weights. Decoder matrices (wq, wk, wv, wo, w1, w2, w3 of all layers) over every real "
    "token: 6x when the decoder trains, 4x when frozen (projector only: no weight gradients, "
    "but the input gradients must still flow back through every layer to the picture tokens). "
    "The tied output matrix (6400 x dim) over target positions only (ours computes logits "
    "nowhere else): 6x or 4x likewise. Projector (768 x dim) over the 50 tokens of each "
    "picture: 4x (its input, CLIP's features, needs no gradient). Not counted: attention "
    "scores (QK^T, PV; about 4% at these lengths), norms, activations, the loss, the optimizer, "
    "embedding lookups. gemm_fraction = useful_gflops / gemm_peak_gflops; on CUDA "
    "mfu = useful FLOP/s / (--peak_tflops x 1e12).")


def decoder_matrix_params(model: MiniMindVLM) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers.") and p.dim() == 2)


def useful_flops(model: MiniMindVLM, batch_samples: List[Sample], train_llm: bool) -> float:
    real_tokens = sum(len(s.ids) for s in batch_samples)
    # position t predicts label t+1 (count_targets' rule)
    targets = sum(sum(1 for label in s.labels[1:] if label != IGNORE_INDEX) for s in batch_samples)
    picture_tokens = len(model.config.image_ids) * len(batch_samples)   # one picture per sample
    passes = 6 if train_llm else 4
    return (passes * decoder_matrix_params(model) * real_tokens
            + passes * model.output.weight.numel() * targets
            + 4 * model.vision_proj.vision_proj[0].weight.numel() * picture_tokens)


def measure_gemm_peak_gflops(device: torch.device) -> dict:
    """The best rate of one big matmul: what the GEMM library reaches on this machine."""
    cuda = device.type == "cuda"
    size, dtype, inner = (8192, torch.bfloat16, 20) if cuda else (2048, torch.float32, 1)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)                                  # warm-up
    best = math.inf
    for _ in range(5):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return {"gflops": 2 * size ** 3 / best / 1e9,
            "how": f"{str(dtype).replace('torch.', '')} {size}x{size} @ {size}x{size}, best of 5"}


class MatmulRecorder(TorchDispatchMode):
    """Notes every matrix multiply dispatched while active, forward and backward alike: the op
    and the layout (shape, strides, dtype) of each operand, so that `time_matmuls_alone` can run
    the same calls again without the rest of the step."""
    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten.baddbmm.default}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.MATMULS:
            layout = [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, layout, kwargs))
        return func(*args, **kwargs)


def operand(layout, device: torch.device) -> torch.Tensor:
    """A random tensor with `layout`'s shape, strides (transposed, broadcast) and dtype."""
    shape, stride, dtype = layout
    storage = 1 + sum((n - 1) * st for n, st in zip(shape, stride) if n > 0)
    return torch.randn(storage, device=device).to(dtype).as_strided(shape, stride)


def time_matmuls_alone(calls, device: torch.device, repeats: int = 2) -> float:
    """Seconds the recorded matmuls take run back to back with nothing between them (best of
    `repeats`, after one untimed pass): what the step would cost if it were only its matmuls."""
    prepared = [(func, [operand(a, device) if isinstance(a, tuple) else a for a in layout], kwargs)
                for func, layout, kwargs in calls]
    best = math.inf
    for attempt in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        for func, args, kwargs in prepared:
            func(*args, **kwargs)
        synchronize(device)
        if attempt:
            best = min(best, time.perf_counter() - t0)
    return best


def measure_matmuls_alone(step, batches: List[List[Sample]], device: torch.device, compiled: bool) -> List[dict]:
    """Runs `step` once more on each batch (untimed; compiled blocks run eagerly, their matmuls
    are the same) to record its matmuls, then times them alone: per batch, its matmul calls and
    the seconds they take."""
    measured = []
    for samples in batches:
        step.activate()
        collated = step.collate(samples)
        eager = torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
        with eager, MatmulRecorder() as recorder:
            step(collated)
        measured.append({"calls": len(recorder.calls), "seconds": time_matmuls_alone(recorder.calls, device)})
    return measured


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_freed_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:   # glibc keeps freed heap pages; hand them back so that RSS means memory in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_in_use_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return 0.0


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak from the memory in use now. False where the OS does not let us."""
    release_freed_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:   # Linux >= 4.0: "5" resets the RSS high-water mark
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10   # bytes on macOS, KiB on Linux


# =========================================================================== timing
def build_and_warm_up(name, make_step, first_batch, shared_mib, device) -> tuple:
    """Build a row and run its (untimed) first step, which allocates the optimizer state; return
    (step, memory the row needs on its own: the shared assets + its peak increase over the step)."""
    log(f"{name}: warm-up")
    release_freed_memory(device)
    before = memory_in_use_mib(device)
    could_reset = reset_peak_memory(device)
    step = make_step()
    step(step.collate(first_batch))
    synchronize(device)
    if not could_reset:
        return step, None
    return step, shared_mib + peak_memory_mib(device) - before


def time_interleaved(steps: dict, batches: List[List[Sample]], n_steps: int, device) -> dict:
    """Timed step k of every row uses batches[k + 1]; the rows take turns step by step (in an order
    rotated every round), so a burst of load from other jobs on a shared machine hits all rows
    alike instead of whichever row happened to be running."""
    names = list(steps)
    times = {name: [] for name in names}
    loads = {name: [] for name in names}
    last_loss = {}
    for k in range(n_steps):
        samples = batches[(k + 1) % len(batches)]
        for name in names[k % len(names):] + names[:k % len(names)]:
            step = steps[name]
            step.activate()
            collated = step.collate(samples)                 # a DataLoader worker's job: not timed
            synchronize(device)
            t0 = time.perf_counter()
            loss = step(collated)
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
            loads[name].append(os.getloadavg()[0])
            last_loss[name] = float(loss)
        log(f"round {k + 1}/{n_steps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names)
            + f" (load {os.getloadavg()[0]:.2f})")
    return {name: {"step_s": times[name], "load_1min_mean": sum(loads[name]) / n_steps,
                   "last_loss": last_loss[name]} for name in names}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per row (after one warm-up step)")
    p.add_argument("--samples", type=int, default=256, help="distinct synthetic samples")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    add_device_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="our rows with torch.compile'd blocks (the trainers' --compile); v1 stays eager")
    p.add_argument("--peak_tflops", type=float, default=989.0,
                   help="CUDA: dense bf16 peak for the MFU (989: H100 SXM)")
    args = p.parse_args(argv)
    if args.samples < args.batch_size:
        p.error("--samples must be at least --batch_size")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    log("building the models (random weights)")
    cfg = VLMConfig.from_preset("512", max_seq_len=640)      # the trainer's default max_seq_len
    encoder = random_clip_b32()
    torch.manual_seed(0)
    model = MiniMindVLM(cfg, encoder).to(device).train()
    if args.compile:   # the v1 row computes with the parameters, never through the blocks
        model.compile_blocks()
    samples = build_samples(args.samples, cfg.image_ids)
    n_batches = args.samples // args.batch_size
    batches = [samples[k * args.batch_size:(k + 1) * args.batch_size] for k in range(n_batches)]
    used = {s.index: s for k in range(args.steps + 1) for s in batches[k % n_batches]}

    log(f"caching CLIP features of the {len(used)} samples the steps use (fp16, as the feature cache stores them)")
    features = {}
    with torch.no_grad():
        ordered = sorted(used)
        for lo in range(0, len(ordered), 16):
            chunk = ordered[lo:lo + 16]
            pixels = torch.stack([used[i].picture() for i in chunk]).to(device)
            for i, f in zip(chunk, encoder(pixels).half().cpu()):
                features[i] = f

    log("measuring the GEMM peak")
    gemm = measure_gemm_peak_gflops(device)

    # All rows train the same decoder tensors (the values do not change the speed), each with its
    # own optimizer and trainable flags; they are built and warmed up one by one (memory), then
    # timed taking turns.
    release_freed_memory(device)
    shared_mib = memory_in_use_mib(device)                 # CLIP, decoder, samples, cached features
    makers = {
        "v1_original": lambda: V1Step(model, device),
        "ours_live_all_trained": lambda: OursStep(model, device, train_llm=True),
        "ours_cached_all_trained": lambda: OursStep(model, device, train_llm=True, features=features),
        "ours_default_projector_only": lambda: OursStep(model, device, train_llm=False, features=features),
    }
    steps, memory = {}, {}
    for name in ROWS:
        steps[name], memory[name] = build_and_warm_up(name, makers[name], batches[0], shared_mib, device)
    timings = time_interleaved(steps, batches, args.steps, device)
    timed_batches = [batches[(k + 1) % n_batches] for k in range(args.steps)]
    alone_batches = timed_batches[:MATMULS_ALONE_BATCHES]
    log(f"the cached rows' matmuls alone, on the first {len(alone_batches)} timed batches")
    alone = {name: measure_matmuls_alone(steps[name], alone_batches, device, args.compile) for name in CACHED_ROWS}
    gemm_again = measure_gemm_peak_gflops(device)          # the best of before and after the rows
    gemm = max(gemm, gemm_again, key=lambda g: g["gflops"])

    timed = [s for b in timed_batches for s in b]
    rows = {}
    for name in ROWS:
        seconds = sum(timings[name]["step_s"])
        row = {"samples_per_s": round(len(timed) / seconds, 3),
               "tokens_per_s": round(sum(len(s.ids) for s in timed) / seconds, 1),
               "step_s": [round(t, 3) for t in timings[name]["step_s"]]}
        if name in CACHED_ROWS:
            train_llm = name != "ours_default_projector_only"
            batch_flops = [useful_flops(model, b, train_llm) for b in timed_batches]
            flops = sum(batch_flops)
            row["useful_gflops"] = round(flops / seconds / 1e9, 2)
            row["gemm_fraction"] = round(row["useful_gflops"] / gemm["gflops"], 3)
            # Over the batches measured alone, against those same batches' timed steps.
            n = len(alone[name])
            matmul_s = sum(m["seconds"] for m in alone[name])
            alone_flops = sum(batch_flops[:n])
            row["matmul_calls_per_step"] = sum(m["calls"] for m in alone[name]) / n
            row["matmuls_alone_share_of_step"] = round(matmul_s / sum(timings[name]["step_s"][:n]), 3)
            row["matmuls_alone_gemm_fraction"] = round(alone_flops / matmul_s / 1e9 / gemm["gflops"], 3)
            if cuda:
                row["mfu"] = round(flops / seconds / (args.peak_tflops * 1e12), 4)
        row["trained_params_m"] = round(sum(p.numel() for p in steps[name].params) / 1e6, 3)
        row["peak_memory_mib"] = None if memory[name] is None else round(memory[name], 1)
        row["last_loss"] = round(timings[name]["last_loss"], 4)
        row["load_1min_mean"] = round(timings[name]["load_1min_mean"], 2)
        rows[name] = row
    base = rows["v1_original"]["samples_per_s"]
    for row in rows.values():
        row["vs_v1"] = round(row["samples_per_s"] / base, 2)
    report = {
        "model": f"MiniMind-V {cfg.dim}x{cfg.n_layers} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M) "
                 f"+ CLIP ViT-B/32, random weights",
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": "bfloat16 autocast (v1: float16 autocast + GradScaler)" if cuda else "float32",
        "threads": args.threads, "batch_size": args.batch_size, "samples": args.samples, "compiled": args.compile,
        "steps": args.steps, "warmup_steps": 1, "timing": "rows take turns step by step (see time_interleaved)",
        "mean_tokens_per_sample": round(sum(len(s.ids) for s in timed) / len(timed), 1),
        "mean_targets_per_sample": round(sum(sum(1 for x in s.labels[1:] if x != IGNORE_INDEX) for s in timed)
                                         / len(timed), 1),
        "v1_positions_per_sample": V1_MAX_SEQ_LEN - 1,
        "results": rows,
        "gemm_peak_gflops": round(gemm["gflops"], 1),
        "gemm_peak_measured": f"{gemm['how']}, {args.threads} threads",
        "useful_gflops_counting": USEFUL_FLOPS_RULE,
        "peak_memory": ("what a process running this row alone would peak at: the shared assets "
                        f"(CLIP, decoder, samples, cached features: {shared_mib:.0f} MiB) + the row's peak "
                        "increase over its first step (optimizer state, activations, gradients); "
                        + ("torch.cuda.max_memory_allocated" if cuda else
                           "peak RSS from getrusage, high-water mark reset through /proc/self/clear_refs")),
        "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "v1_source": "github.com/jingyaogong/minimind-v @ 3cc902b (2024-11-19), the last v1 commit",
        "cpu": cpu_name(), "torch": torch.__version__,
    }
    if cuda:
        report["peak_tflops"] = args.peak_tflops
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
