"""Training throughput of the 512x8 VLM: our trainer's step vs a re-creation of the v1 loop.

    python bench/bench_train.py [--steps 3] [--batch_size 8] [--device cpu]

Prints one JSON object: samples/s and tokens/s (real, unpadded tokens) for
- ours, live CLIP:        dynamic padding, all images of the batch through CLIP in one call,
                          vectorised splice, vocabulary projection only where there are labels;
- ours, cached features:  the same with the CLIP features read from the feature cache;
- v1 baseline (live):     every sample padded to max_seq_len (640), CLIP run picture by picture,
                          placeholders located with a Python loop over positions and rows,
                          logits for every position (a re-creation from the v1 description,
                          written for this benchmark).
Weights are random (the speed does not depend on them): the MiniMind 512x8 decoder and a CLIP
ViT-B/32-shaped vision tower built in memory. Samples look like v1 pretrain captions: a short
question, one picture (50 tokens) and a caption of ~30 tokens.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.config import VLMConfig  # noqa: E402
from model.language import rope_rotation  # noqa: E402
from model.vision import VisionEncoder, clip_processor_class  # noqa: E402
from model.vlm import MiniMindVLM  # noqa: E402

IGNORE = -100


def random_clip_b32() -> VisionEncoder:
    """A randomly initialised CLIP ViT-B/32 vision tower (also used by bench_generate.py)."""
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    # CLIPVisionConfig's defaults are ViT-B/32 at 224 px: 12 layers, width 768, 50 tokens.
    return VisionEncoder(CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=32)).eval(),
                         clip_processor_class()())


def make_batch(cfg, batch_size, seed=0):
    """Caption-like samples: template + question (~15 tokens), image span, caption 20-40 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(batch_size):
        q = torch.randint(100, 6400, (int(torch.randint(10, 20, (1,), generator=g)),), generator=g).tolist()
        a = torch.randint(100, 6400, (int(torch.randint(20, 40, (1,), generator=g)),), generator=g).tolist()
        prompt = [1, 320, 275, 201] + cfg.image_ids + [201] + q + [2, 201, 1, 1078, 538, 201]
        ids.append(prompt + a + [2])
        labels.append([IGNORE] * len(prompt) + a + [2])
    return ids, labels


def pad(rows, width, value):
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def ours_step(model, opt, ids, labels, pixels=None, features=None):
    width = max(map(len, ids))                      # dynamic padding
    x, y = pad(ids, width, 0), pad(labels, width, IGNORE)
    vision = {"pixel_values": pixels} if pixels is not None else {"image_features": features}
    loss = model(x, labels=y, **vision).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def v1_step(model, opt, ids, labels, pixels, max_seq_len=640):
    """The v1 loop: fixed-length padding, CLIP per picture, a Python placeholder search."""
    x, y = pad(ids, max_seq_len, 0), pad(labels, max_seq_len, IGNORE)
    feats = torch.stack([model.vision_encoder(pixels[i:i + 1])[0] for i in range(len(pixels))])
    h = model.tok_embeddings(x)
    span = model.config.image_ids
    proj = model.vision_proj(feats)
    rows = []
    for b in range(x.shape[0]):                     # python loops over rows and positions
        row_ids, row = x[b].tolist(), h[b]
        for start in range(len(row_ids) - len(span) + 1):
            if row_ids[start:start + len(span)] == span:
                row = torch.cat([row[:start], proj[b], row[start + len(span):]], dim=0)
                break
        rows.append(row)
    h = torch.stack(rows)
    rotation = rope_rotation(model.rope_cos[:max_seq_len], model.rope_sin[:max_seq_len])
    for layer in model.layers:
        h, _ = layer(h, rotation, None)
    logits = model.output(model.norm(h))             # every position through the vocabulary
    loss_mask = (y[:, 1:] != IGNORE).float()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1).clamp(min=0),
                           reduction="none")
    loss = (loss * loss_mask.reshape(-1)).sum() / loss_mask.sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(fn, steps, batch_size, tokens):
    fn()                                            # warm-up (allocations, kernels)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    dt = (time.perf_counter() - t0) / steps
    return {"step_s": round(dt, 3), "samples_per_s": round(batch_size / dt, 2), "tokens_per_s": round(tokens / dt, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    encoder = random_clip_b32()
    cfg = VLMConfig.from_preset("512", max_seq_len=640)
    torch.manual_seed(0)
    model = MiniMindVLM(cfg, encoder).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids, labels = make_batch(cfg, args.batch_size)
    tokens = sum(map(len, ids))
    pixels = torch.randn(args.batch_size, 3, 224, 224)
    with torch.no_grad():
        features = encoder(pixels).half()           # what the cache stores
    results = {
        "ours_live_clip": timed(lambda: ours_step(model, opt, ids, labels, pixels=pixels), args.steps, args.batch_size, tokens),
        "ours_cached_features": timed(lambda: ours_step(model, opt, ids, labels, features=features), args.steps, args.batch_size, tokens),
        "v1_baseline_live_clip": timed(lambda: v1_step(model, opt, ids, labels, pixels), args.steps, args.batch_size, tokens),
    }
    base = results["v1_baseline_live_clip"]["samples_per_s"]
    print(json.dumps({
        "model": "512x8 (27.3M) + CLIP ViT-B/32 (random weights)", "device": "cpu", "dtype": "float32",
        "threads": args.threads, "batch_size": args.batch_size, "mean_tokens_per_sample": round(tokens / args.batch_size, 1),
        "v1_max_seq_len": 640, "cpu": platform.processor() or platform.machine(), "results": results,
        "speedup_live_vs_v1": round(results["ours_live_clip"]["samples_per_s"] / base, 2),
        "speedup_cached_vs_v1": round(results["ours_cached_features"]["samples_per_s"] / base, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
