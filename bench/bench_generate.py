"""Generation speed of the 512x8 MiniMind-V on this CPU, against a re-implementation of the
original v1 decoding loop.

    python bench/bench_generate.py [--new_tokens 100] [--repeats 3] [--threads 2]

One picture plus a question, exactly `--new_tokens` new tokens (eos disabled), greedy. Prints
JSON: time to first token (picture encoding + prompt) and decode tokens/s, with the KV cache
on and off, and for the v1-style baseline. Random weights and a randomly initialised CLIP
ViT-B/32 (built in memory from CLIPVisionConfig's defaults): speed does not depend on the
values. Each figure is the median of `--repeats` runs (a single run without the cache).
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model.config import VLMConfig  # noqa: E402
from model.inference import DEFAULT_QUESTION, EVAL_IMAGES, build_prompt_ids, list_images  # noqa: E402
from model.vision import load_image  # noqa: E402
from model.prompt import load_tokenizer  # noqa: E402
from model.vlm import MiniMindVLM  # noqa: E402

from bench_train import random_clip_b32  # noqa: E402  (same folder)


class V1Baseline:
    """BASELINE, for comparison only: the decoding loop of MiniMind-V v1, re-implemented from its
    description on top of the same weights and self-contained (it does not call our modules, so
    speeding up ours cannot speed it up). What it does, as v1 did:

    - the KV cache is state on the attention modules (set as attributes, grown with torch.cat,
      repeated for the query heads by expand + reshape);
    - every step re-runs the placeholder search (unfold + compare + .item()) over the whole
      sequence so far and re-projects the image features, although only the prompt step uses
      them;
    - the decoding step uses plain matmul-softmax attention (v1 used SDPA only for T > 1),
      RoPE as a complex multiply, RMSNorm as x * rsqrt(mean(x^2) + eps);
    - the repetition penalty walks the distinct tokens of the sequence in Python every step
      (even at penalty 1.0, its default).
    The picture is encoded once by CLIP, as v1 did before its loop. Greedy.
    """

    def __init__(self, model: MiniMindVLM):
        self.m = model
        self.span = model.image_ids.numel()

    def find_placeholders(self, ids):
        windows = ids.unfold(1, self.span, 1)
        matches = (windows == self.m.image_ids).all(dim=2)
        return [(b, i.item()) for b in range(ids.shape[0]) for i in matches[b].nonzero()[:, 0]]

    @staticmethod
    def rms_norm(norm, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).type_as(x) * norm.weight

    @staticmethod
    def rope(x, pos_cis):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * pos_cis[None, :, None, :]).flatten(3).type_as(x)

    def attention(self, attn, x, pos_cis, use_cache):
        B, T, _ = x.shape
        q = self.rope(attn.wq(x).view(B, T, attn.n_heads, attn.head_dim), pos_cis)
        k = self.rope(attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim), pos_cis)
        v = attn.wv(x).view(B, T, attn.n_kv_heads, attn.head_dim)
        if use_cache:
            if getattr(attn, "v1_k", None) is not None:
                k, v = torch.cat([attn.v1_k, k], 1), torch.cat([attn.v1_v, v], 1)
            attn.v1_k, attn.v1_v = k, v
        rep = attn.n_heads // attn.n_kv_heads
        S = k.shape[1]
        k = k[:, :, :, None].expand(B, S, attn.n_kv_heads, rep, attn.head_dim).reshape(B, S, -1, attn.head_dim)
        v = v[:, :, :, None].expand(B, S, attn.n_kv_heads, rep, attn.head_dim).reshape(B, S, -1, attn.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if T > 1:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(2, 3)) / math.sqrt(attn.head_dim)
            out = F.softmax(scores.float(), dim=-1).type_as(q) @ v
        return attn.wo(out.transpose(1, 2).reshape(B, T, -1))

    def forward(self, ids, step_ids, start, image_features, use_cache):
        m = self.m
        h = m.tok_embeddings(step_ids)
        projected = m.vision_proj(image_features)             # every step
        for n, (b, i) in enumerate(self.find_placeholders(ids)):   # every step, whole sequence
            if i >= start:                                     # only the prompt step splices
                h[b, i - start:i - start + self.span] = projected[n]
        T = step_ids.shape[1]
        pos_cis = torch.complex(m.rope_cos[start:start + T], m.rope_sin[start:start + T])
        for layer in m.layers:
            h = h + self.attention(layer.attention, self.rms_norm(layer.attention_norm, h), pos_cis, use_cache)
            ff = layer.feed_forward
            x = self.rms_norm(layer.ffn_norm, h)
            h = h + ff.w2(F.silu(ff.w1(x)) * ff.w3(x))
        return m.output(self.rms_norm(m.norm, h)[:, [-1]])[:, -1]

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values, max_new_tokens, use_cache=True, rp=1.0):
        """Greedy; yields [B, 1] per step like MiniMindVLM.generate(stream=True)."""
        for layer in self.m.layers:
            layer.attention.v1_k = layer.attention.v1_v = None
        image_features = self.m.vision_encoder(pixel_values)
        ids = input_ids
        for step in range(max_new_tokens):
            start = ids.shape[1] - 1 if use_cache and step else 0
            logits = self.forward(ids, ids[:, start:], start, image_features, use_cache)
            for token in set(ids.tolist()[0]):
                logits[:, token] /= rp
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            yield ids[:, -1:]


def timed(steps):
    """(seconds to the first token, decode tokens/s after it, all tokens) of a token stream."""
    t0 = time.perf_counter()
    tokens, first = [], None
    for tok in steps:
        tokens.append(int(tok[0, 0]))
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (len(tokens) - 1) / (end - first), tokens


def matmul_floor_ms(model: MiniMindVLM, repeats: int = 20) -> float:
    """Milliseconds per token of the weight matmuls alone (every 2-D weight of the decoder
    times one token's activation): the floor under any decode step at batch 1 on this machine,
    whatever the bookkeeping around it costs."""
    weights = [w for name, w in model.named_parameters()
               if w.dim() == 2 and not name.startswith("vision_proj")]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    with torch.inference_mode():
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeats):
                for w in weights:
                    F.linear(xs[w.shape[1]], w)
            best = min(best, (time.perf_counter() - t0) / repeats * 1000)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new_tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = VLMConfig.from_preset("512")
    model = MiniMindVLM(config, random_clip_b32()).eval()
    tokenizer = load_tokenizer()
    image = load_image(list_images([EVAL_IMAGES])[0])
    input_ids = torch.tensor([build_prompt_ids(tokenizer, DEFAULT_QUESTION, 1)])
    baseline = V1Baseline(model)

    # Generators: picture preprocessing happens inside the timed region, for every loop alike.
    def ours(use_cache):
        pixel_values = model.vision_encoder.preprocess([image])
        yield from model.generate(input_ids, max_new_tokens=args.new_tokens, eos_token_id=-1,
                                  use_cache=use_cache, stream=True, pixel_values=pixel_values)

    def v1():
        yield from baseline.generate(input_ids, model.vision_encoder.preprocess([image]), args.new_tokens)

    # (generator factory, repeats): without a cache every step re-reads the whole sequence,
    # so one run of it is enough to show the difference and keeps the bench short.
    runs = {"kv_cache": (lambda: ours(True), args.repeats), "no_kv_cache": (lambda: ours(False), 1),
            "v1_baseline": (v1, args.repeats)}
    timed(ours(True))   # warm-up
    # Round-robin, so that a burst of load from other processes hits every loop alike.
    samples = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, (make, repeats) in runs.items():
            if r < repeats:
                samples[name].append(timed(make()))
                print(f"run {r + 1}: {name} done", file=sys.stderr, flush=True)   # progress
    results = {name: {"ttft_s": round(statistics.median(s[0] for s in got), 4),
                      "decode_tok_s": round(statistics.median(s[1] for s in got), 1),
                      "new_tokens": len(got[0][2])} for name, got in samples.items()}
    outputs = {name: got[0][2] for name, got in samples.items()}
    floor_ms = matmul_floor_ms(model)
    v1_step_ms = 1000 / results["v1_baseline"]["decode_tok_s"]
    report = {
        "config": f"dim={config.dim} n_layers={config.n_layers} vision=CLIP ViT-B/32 (random)",
        "prompt_tokens": input_ids.shape[1], "threads": args.threads, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        # Other processes on the machine slow every figure: report how busy it was.
        "load_average_1min": round(os.getloadavg()[0], 2), **results,
        "speedup_vs_v1": {
            "decode": round(results["kv_cache"]["decode_tok_s"] / results["v1_baseline"]["decode_tok_s"], 2),
            "ttft": round(results["v1_baseline"]["ttft_s"] / results["kv_cache"]["ttft_s"], 2)},
        # A decode step can never be faster than its weight matmuls: this bounds any speedup.
        "matmul_floor_ms_per_token": round(floor_ms, 2),
        "max_possible_decode_speedup_vs_v1": round(v1_step_ms / floor_ms, 2),
        # Same weights, greedy: all three loops must produce the same tokens.
        "same_tokens": outputs["kv_cache"] == outputs["no_kv_cache"] == outputs["v1_baseline"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
