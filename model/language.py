"""The MiniMind decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU (or MoE), tied embeddings.

Attribute names mirror the original MiniMind so that published `.pth` files load key for key:
`tok_embeddings`, `layers.{i}.attention.{wq,wk,wv,wo}`, `layers.{i}.feed_forward.{w1,w2,w3}`,
`attention_norm`, `ffn_norm`, `norm`, `output` (tied to `tok_embeddings`).

The KV cache is an object passed in and returned by `forward` (`KVCache`), never state on the
modules, so several generations can run side by side and training is unaffected.
"""
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import IGNORE_INDEX, VLMConfig


@dataclass
class LMOutput:
    # [B, T, vocab]; with labels, only the rows of the positions that have a target [N, vocab]
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None       # with labels: token cross entropy (+ MoE balancing)
    past_key_values: Optional["KVCache"] = None


class KVCache:
    """Keys and values of every position seen so far, one [B, kv_heads, capacity, head_dim]
    buffer per layer, written in place: a decoding step appends one position instead of
    copying the whole past (torch.cat) or repeating it for the query heads. When a write goes
    past the capacity, every buffer moves into one twice as big (`grow`)."""

    def __init__(self, n_layers: int, capacity: int = 256):
        self.keys: List[Optional[torch.Tensor]] = [None] * n_layers
        self.values: List[Optional[torch.Tensor]] = [None] * n_layers
        self.capacity = capacity
        self.length = 0   # positions already stored (the model advances it after each forward)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, position: Optional[torch.Tensor] = None):
        """Store k, v [B, kv_heads, T, D]; return the keys and values to attend over.

        Without `position`: after the `length` positions stored so far, returning exactly those.
        With `position` (a tensor of T positions, inside the capacity: a decoding step, see
        `MiniMindLM.decode_step`): there, returning the whole buffers, whose positions not
        written yet the step's mask hides, so that every step has the same shapes."""
        if position is not None:
            self.keys[layer].index_copy_(2, position, k)
            self.values[layer].index_copy_(2, position, v)
            return self.keys[layer], self.values[layer]
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            self.grow(max(end, 2 * self.capacity))
        if self.keys[layer] is None:
            # Zeroed: a decoding step attends over the whole buffer, and 0 * a garbage NaN is NaN.
            self.keys[layer], self.values[layer] = (k.new_zeros(*k.shape[:2], self.capacity, k.shape[3])
                                                    for _ in range(2))
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def take_rows(self, rows: torch.Tensor, part: "KVCache", batch_size: int):
        """Copy the buffers of `part`, a cache of the same capacity filled for some rows of the
        batch, into those rows (buffers for all `batch_size` rows are made, zeroed, on first use)."""
        for store, source in ((self.keys, part.keys), (self.values, part.values)):
            for i, buf in enumerate(source):
                if store[i] is None:
                    store[i] = buf.new_zeros(batch_size, *buf.shape[1:])
                store[i][rows] = buf

    def keep_rows(self, rows: torch.Tensor):
        """Keep only these rows of the batch, in this order (batched generation drops the rows
        that have finished)."""
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is not None:
                    store[i] = buf[rows]

    def grow(self, capacity: int):
        """Move every buffer into a zeroed one of `capacity` positions."""
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is not None:
                    store[i] = buf.new_zeros(*buf.shape[:2], capacity, buf.shape[3])
                    store[i][:, :, :buf.shape[2]] = buf
        self.capacity = capacity


def rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., features] as a matrix [rows, features], in inference. Element-wise work that a
    matmul reads is done on this 2-D view: compiled, the matmul then reads the result as it was
    written. Done on [B, 1, features], torch.compile hands the matmul a view with a zero stride,
    which the CPU matmul copies first: 25 copies per decoding step of the 512x8 model, about
    0.2 ms (docs/decode_speed.md). The values are the same either way.

    With gradients x stays as it is: in the 2-D form the backward sums the weight gradients in
    another order, the last bits differ, and the reduced demo's outcome was seen to hang on
    those bits (docs/demo_notes.md)."""
    return x if torch.is_grad_enabled() else x.reshape(-1, x.shape[-1])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32: under bf16 autocast the mean of squares loses too many bits.
        x32, weight = x.float(), self.weight.float()
        if x.is_cuda or torch.is_grad_enabled() or torch.compiler.is_compiling():
            # One fused kernel on CUDA, fused by the compiler too (on rows(): see there).
            return F.rms_norm(rows(x32), (x.shape[-1],), weight, self.eps).type_as(x).view(x.shape)
        # Eager inference on the CPU: F.rms_norm runs these same ops (the same bits) plus
        # reshapes and copies of its own, and the plain formula takes 30% less time per call
        # when decoding (docs/decode_speed.md). Not in training: its backward would sum in
        # another order than F.rms_norm's, which changes the last bits (see rows()).
        return (x32 * torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + self.eps) * weight).type_as(x)


def rope_tables(head_dim: int, max_len: int, theta: float):
    """The cos and sin tables [max_len, head_dim] that `apply_rope` takes: every angle twice, as
    (cos, cos) and (-sin, +sin) for the two members of its pair."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return angles.cos().repeat_interleave(2, dim=-1), torch.stack((-angles.sin(), angles.sin()), dim=-1).flatten(-2)


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x0, x1), (x2, x3), ... of the last dim by their angles (MiniMind's
    pairing), in fp32: (x0 cos - x1 sin, x1 cos + x0 sin) = x * cos + (x1, x0) * (-sin, sin).
    Real arithmetic, which torch.compile fuses (it cannot fuse a complex multiply), in the
    fewest ops. x: [B, T, H, D]; cos, sin: [T, D] (see rope_tables), the same for every head."""
    x = x.float()
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos[:, None] + swapped * sin[:, None]


def dropout_layer(p: float) -> nn.Module:
    # nn.Dropout(0) still costs a call per layer in every decoding step.
    return nn.Dropout(p) if p > 0 else nn.Identity()


def refresh_inference_copy(owner: nn.Module, slot: str, weights: List[torch.Tensor]) -> torch.Tensor:
    """The weights of linear layers that read the same input, one beside the other and
    transposed ([in, sum of outs], contiguous), kept in `owner.__dict__[slot]` (no parameter, no
    state_dict key) and rebuilt only when a weight changed since: in place (an optimizer step,
    load_state_dict: the version counters move) or replaced (.to(): the addresses move).

    Why transposed: at batch 1 (a decoding step) `x @ copy` runs through the matrix row after
    row. With MKL on the AMD EPYC this project measured on (2026-12-02) that was about 1.7x as
    fast as `F.linear(x, weight)` for the wide matrices (gate/up, the 6400-word output layer),
    about the same for the others and for batches; both give the same values up to float
    rounding (docs/decode_speed.md)."""
    key = [(w.data_ptr(), w._version) for w in weights]
    if owner.__dict__.get(slot, (None,))[0] != key:
        owner.__dict__[slot] = (key, torch.cat(weights).t().contiguous().detach())
    return owner.__dict__[slot][1]


class Stacked(nn.Module):
    """A module whose linear layers named in `stacked` read the same input: one matmul with their
    weights side by side does the work of all of them (at batch 1 a matmul also has a fixed cost
    besides reading its weight). The layers stay separate modules, so parameters, state_dict
    keys, gradients and optimizers all see the published layout."""
    stacked = ()

    def stacked_linear(self, x: torch.Tensor, decoding: bool) -> torch.Tensor:
        """The stacked layers' outputs side by side. With gradients on, through the weights
        concatenated in every forward, so that gradients reach each layer. Otherwise through
        the copy that `refresh_stacked` keeps (concatenating would cost a decoding step as much
        as the matmul): checked first, except in decoding steps (torch.compile cannot trace the
        check; `generate` refreshes the copies before its first step)."""
        if torch.is_grad_enabled():
            return F.linear(x, torch.cat([getattr(self, name).weight for name in self.stacked]))
        if not decoding:
            self.refresh_stacked()
        return torch.matmul(x, self.__dict__["_stacked"][1])

    def refresh_stacked(self):
        """Bring the copy of the stacked weights up to date (see `refresh_inference_copy`)."""
        refresh_inference_copy(self, "_stacked", [getattr(self, name).weight for name in self.stacked])


def one_query_attention(q, k, v, mask):
    """SDPA's result for one new position per row (a decoding step): q [B, heads, 1, D], k and v
    [B, kv_heads, S, D], mask boolean (True: attend) or additive, broadcastable to [B, 1, 1, S].
    As two batched matmuls, each key head's group of query heads in one: on the CPU, for a
    batch of 16-64 rows, in 50-65% of the time of SDPA's flash kernel, which is built for many
    queries (docs/batched_eval.md). At batch 1 the kernel is the faster one."""
    B, H, _, D = q.shape
    K = k.shape[1]
    scores = torch.matmul(q.reshape(B, K, H // K, D), k.transpose(-1, -2)) * D ** -0.5   # [B, K, H/K, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(scores.float().softmax(dim=-1).type_as(v), v).view(B, H, 1, D)   # fp32 softmax, as SDPA


class Attention(Stacked):
    stacked = ("wq", "wk", "wv")

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = dropout_layer(cfg.dropout)

    def forward(self, x, rope, mask, cache: Optional[KVCache] = None, layer: int = 0, position=None):
        B, T, _ = x.shape
        H, K = self.n_heads, self.n_kv_heads
        qkv = self.stacked_linear(x, position is not None).view(B, T, H + 2 * K, self.head_dim)
        q, k = apply_rope(qkv[:, :, :H + K], *rope).type_as(x).split([H, K], dim=2)   # side by side: one call
        v = qkv[:, :, H + K:]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))   # [B, heads, T, D]
        if cache is not None:
            k, v = cache.update(layer, k, v, position)
        if T == 1 and B > 1 and x.device.type == "cpu" and not self.training:   # a batched decoding step
            out = one_query_attention(q, k, v, mask)
        else:
            # enable_gqa: query head h reads kv head h // (n_heads / n_kv_heads), as
            # repeat_interleave would give, without materialising the repeated keys and values.
            # mask None means "plain causal over new tokens with no cache" (the training case).
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_heads != self.n_kv_heads)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.wo(out))


class FeedForward(Stacked):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""
    stacked = ("w1", "w3")

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.dropout = dropout_layer(cfg.dropout)

    def forward(self, x, decoding: bool = False):
        gate, up = self.stacked_linear(rows(x), decoding).chunk(2, dim=-1)
        return self.dropout(self.w2(F.silu(gate) * up)).view(x.shape)


class MoEGate(nn.Module):
    """Softmax router choosing `num_experts_per_tok` of `n_routed_experts` for every token."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.alpha, self.seq_aux, self.norm_topk = cfg.aux_loss_alpha, cfg.seq_aux, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        B, T, _ = x.shape
        scores = F.linear(x.reshape(B * T, -1).float(), self.weight.float()).softmax(dim=-1)
        top_w, top_i = scores.topk(self.top_k, dim=-1)
        if self.top_k > 1 and self.norm_topk:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        aux = scores.new_zeros(())
        if self.training and self.alpha > 0:
            # Load balancing: (fraction of routings an expert gets) x (its mean router prob),
            # scaled so a perfectly balanced router scores 1 * alpha.
            if self.seq_aux:   # balance within every sequence
                load = torch.zeros(B, self.n_experts, device=x.device)
                load.scatter_add_(1, top_i.view(B, -1), torch.ones(B, T * self.top_k, device=x.device))
                load = load / (T * self.top_k / self.n_experts)
                aux = (load * scores.view(B, T, -1).mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:              # balance over the whole batch
                load = F.one_hot(top_i.view(-1), self.n_experts).float().mean(0) * self.n_experts
                aux = (load * scores.mean(0)).sum() * self.alpha
        return top_i, top_w.type_as(x), aux


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.n_routed_experts))
        self.gate = MoEGate(cfg)
        self.shared_experts = FeedForward(cfg) if cfg.n_shared_experts else None

    def forward(self, x, decoding: bool = False):
        """Returns (output, load-balancing aux loss). Its experts concatenate their weights at
        every call, decoding or not (a step routes a token to only some of them)."""
        B, T, D = x.shape
        top_i, top_w, aux = self.gate(x)
        flat = x.reshape(-1, D)
        out = torch.zeros_like(flat)
        # One pass per expert over just the tokens routed to it (same code for training and
        # inference; there are only a handful of experts). In training an expert no token chose
        # still runs, on none: every parameter then has a gradient (zero), as DDP without
        # find_unused_parameters needs, and as the original MiniMind's MoE did.
        training = self.training and torch.is_grad_enabled()
        for e, expert in enumerate(self.experts):
            token_idx, slot = (top_i == e).nonzero(as_tuple=True)
            if token_idx.numel() or training:
                out.index_add_(0, token_idx, expert(flat[token_idx]) * top_w[token_idx, slot, None])
        out = out.view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, aux


class Block(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoEFeedForward(cfg) if cfg.use_moe else FeedForward(cfg)

    def forward(self, x, rope, mask, cache: Optional[KVCache] = None, layer: int = 0, position=None):
        """Returns (output, MoE load-balancing loss or None for a dense block)."""
        x = x + self.attention(self.attention_norm(x), rope, mask, cache, layer, position)
        ff = self.feed_forward(self.ffn_norm(x), position is not None)
        ff, aux = ff if isinstance(ff, tuple) else (ff, None)
        return x + ff, aux


def build_attention_mask(attention_mask: Optional[torch.Tensor], T: int, past_len: int, device):
    """Boolean SDPA mask [B, 1, T, past_len+T], or None where SDPA's own causal path is exact.

    `attention_mask` covers all past_len+T positions (1 real, 0 padding). Only left padding
    (batched generation) needs it: with right padding (training) causality alone keeps real
    tokens from seeing the padding, so the trainer passes no mask and keeps the fast kernel.
    A left-padding query may see no real key at all; letting every query see itself keeps
    those rows finite (their outputs are never used).
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past_len == 0 or T == 1):
        return None          # is_causal (or no mask for a single new token) is exact
    S = past_len + T
    if attention_mask is None:
        attention_mask = torch.ones(1, S, dtype=torch.bool, device=device)
    q_pos = torch.arange(past_len, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    causal = k_pos <= q_pos                                            # [T, S]
    keep = causal[None] & attention_mask.bool()[:, None, :]           # [B, T, S]
    keep = keep | (k_pos == q_pos)[None]
    return keep[:, None]


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """How many positions of `labels` the loss scores: position t predicts label t+1 (labels are
    aligned with the input ids, the HF convention), and IGNORE_INDEX marks no target."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


class MiniMindLM(nn.Module):
    """The decoder alone: token ids (or ready embeddings) in, logits (and a loss) out."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = dropout_layer(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight   # tied: both keys appear in state_dict
        self.apply(self._init_weights)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        # Not persistent: derived from the config, and absent from the published checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def _init_weights(module):
        # Small normal init (as in GPT-2): the default N(0, 1) embedding, tied to the output
        # layer, would start training from logits of size ~sqrt(dim) and a loss near 60.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95)):
        """AdamW over the trainable parameters, decaying only matrices (linear and embedding
        weights); norms and biases keep their scale, as weight decay would only shrink them.
        Fused (one kernel over all parameters) on CUDA and on the CPU: on the CPU the step of
        the 512x8 model took 42 ms instead of 180 ms (docs/bench_train.md)."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
        fused = bool(trainable) and trainable[0].device.type in ("cuda", "cpu")
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas,
                                 fused=fused or None)

    def forward(self, input_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                past_key_values: Optional[KVCache] = None, use_cache: bool = False, logits_to_keep: int = 0,
                num_items_in_batch=None) -> LMOutput:
        """Token ids or their embeddings [B, T] -> LMOutput.

        `past_key_values` (a KVCache, extended in place) holds the positions before these; with
        use_cache and none given, a new one is started. `attention_mask` covers past and new
        positions (1 real, 0 padding). With `labels` the output has the loss: the summed token
        cross entropy divided by `num_items_in_batch` (default: this batch's target count; the
        trainer passes its share of the whole step's count, so that micro-batches and processes
        add up to one exact mean), plus the MoE balancing loss weighted by the same share.
        """
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        T = h.shape[1]
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(len(self.layers), capacity=T)
        past_len = cache.length if cache is not None else 0
        if past_len + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past_len + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        h = self.dropout(h)
        rope = self.rope_cos[past_len:past_len + T], self.rope_sin[past_len:past_len + T]
        mask = build_attention_mask(attention_mask, T, past_len, h.device)
        aux_loss = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            h, layer_aux = layer(h, rope, mask, cache, i)
            if layer_aux is not None:
                aux_loss = aux_loss + layer_aux
        if cache is not None:
            cache.length += T
        h = self.norm(h)
        if labels is None:
            if logits_to_keep:   # generation only needs the last position
                h = h[:, -logits_to_keep:]
            return LMOutput(logits=self.output_logits(h), past_key_values=cache if use_cache else None)
        if logits_to_keep:
            raise ValueError("labels and logits_to_keep do not go together")
        # Only positions that have a target go through the vocabulary projection: in a VLM
        # sample most positions are prompt and picture tokens, and that matmul is the biggest
        # one of a small model. So with labels, `logits` holds just those rows [N, vocab].
        targets = labels[:, 1:]
        has_target = targets != IGNORE_INDEX
        logits = self.output(h[:, :-1][has_target])
        ce_sum = F.cross_entropy(logits.float(), targets[has_target], reduction="sum")
        n_targets = has_target.sum()
        normaliser = n_targets.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = (ce_sum + aux_loss * n_targets) / normaliser
        return LMOutput(logits=logits, loss=loss)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 inputs_embeds: Optional[torch.Tensor] = None, image_positions: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, eos_token_id: Optional[int] = None, use_cache: bool = True,
                 stream: bool = False):
        """Sample up to `max_new_tokens` NEW tokens for a batch of (left-padded) prompts.

        `inputs_embeds` [B, T, dim] replaces the prompt's token embeddings (the VLM passes the
        prompt with its pictures spliced in); `image_positions` [B, T] marks the prompt positions
        that hold picture tokens, which the repetition penalty leaves alone. temperature 0 means
        greedy. The caller puts the model in eval mode (generation never flips training state
        behind the caller's back). Returns a LongTensor [B, n_new] (finished rows padded with
        eos), or with stream=True a generator that yields a [B, 1] tensor per step.
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        steps = self._generate_steps(input_ids, attention_mask, inputs_embeds, image_positions, max_new_tokens,
                                     temperature, top_k, top_p, repetition_penalty, eos_token_id, use_cache)
        if stream:
            return steps
        out = list(steps)
        return torch.cat(out, dim=1) if out else input_ids.new_zeros(input_ids.shape[0], 0)

    def decode_step(self, tokens: torch.Tensor, position: torch.Tensor, cache: KVCache,
                    pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Next-token logits [B, vocab] after one new token per row, `tokens` [B, 1], which go at
        `position` (a 1-element long tensor, inside the capacity) of `cache`, filled up to there
        by the prompt's forward. `pad_mask` [B, >= capacity] is False at left padding.

        The shapes only change when the cache grows (the position is a tensor, and attention
        spans the cache's whole capacity under a mask): torch.compile compiles it once, and a
        CUDA graph can replay it (see `compile_decoding`). The projections use the stacked
        weights that `refresh_stacked` updates (`generate` calls it before its first step)."""
        h = self.tok_embeddings(tokens)
        capacity = cache.capacity
        keep = torch.arange(capacity, device=h.device) <= position      # causal: the past and itself
        if pad_mask is not None:
            keep = keep & pad_mask[:, :capacity]
        # Additive, made once here rather than from a boolean mask in every layer's attention.
        mask = torch.where(keep, 0.0, float("-inf")).to(h.dtype).view(-1, 1, 1, capacity)
        rope = self.rope_cos[position], self.rope_sin[position]
        for i, layer in enumerate(self.layers):
            h, _ = layer(h, rope, mask, cache, i, position)
        return self.output_logits(self.norm(h), decoding=True)[:, -1]

    def output_logits(self, h: torch.Tensor, decoding: bool = False) -> torch.Tensor:
        """Vocabulary logits of final hidden states. Without gradients through a transposed copy
        of the (tied) output weight, kept like the stacked weights' (`refresh_inference_copy`):
        at batch 1 it is the biggest matmul of a decoding step."""
        if torch.is_grad_enabled():
            return self.output(h)
        if not decoding:
            refresh_inference_copy(self, "_output", [self.output.weight])
        # On rows(): the last positions of a batched prefill, a strided [B, 1, dim] slice, would
        # go through a batched matmul with the weight repeated per row, 5-8 times slower.
        return torch.matmul(rows(h), self.__dict__["_output"][1]).view(*h.shape[:-1], -1)

    def refresh_stacked(self):
        """Bring the weight copies of `decode_step` up to date (see `Stacked`, `output_logits`)."""
        refresh_inference_copy(self, "_output", [self.output.weight])
        for layer in self.layers:
            for module in (layer.attention, layer.feed_forward):
                if isinstance(module, Stacked):
                    module.refresh_stacked()

    def compile_blocks(self) -> "MiniMindLM":
        """torch.compile each block, in place, for training (what the trainers' --compile does).
        Block by block: the blocks are identical, so one compiled graph serves all of them; the
        splice and the label selection around them (data-dependent shapes) stay eager; and the
        state_dict keeps its published keys. Batch lengths vary: dynamic shapes."""
        for layer in self.layers:
            layer.compile(dynamic=True)
        return self

    def compile_decoding(self, compile: bool = True, cuda_graph: bool = True) -> "MiniMindLM":
        """Opt in to faster decoding steps for every later `generate` (what --compile turns on).

        compile: `decode_step` goes through torch.compile, with dynamic shapes: compiled on its
        first use, once for batch size 1 and once for larger batches, whatever the lengths.
        Should compiling fail (no C++ compiler, ...), a warning, and decoding goes on eagerly.
        cuda_graph: on CUDA, the step (compiled or not) is captured as a CUDA graph after the
        first new token, and again whenever the cache grows, and replayed: one launch per token
        instead of hundreds. Not for MoE models: routing tokens to experts picks rows by data
        (`nonzero`), which a graph cannot capture. `compile_decoding(False, False)` undoes both.
        Call it after moving the model to its device: the compile options depend on it."""
        # On the CPU the compiled step's ~70 kernel calls are made from generated C++ instead of
        # Python: 8-13% less time per token for the 512x8 model (docs/decode_speed.md). On CUDA
        # the CUDA graph already removes the per-call cost.
        on_cpu = next(self.parameters()).device.type == "cpu"
        options = {"cpp_wrapper": True} if on_cpu else None
        # In __dict__, not as a module attribute: the compiled function is no weight or submodule.
        self.__dict__["_compiled_step"] = (torch.compile(self.decode_step, dynamic=True, options=options)
                                           if compile else None)
        self.__dict__["_cuda_graph"] = cuda_graph and not self.config.use_moe
        return self

    def _prefill(self, embeds, mask, cache: Optional[KVCache]) -> torch.Tensor:
        """Next-token logits [B, vocab] after the (left-padded) prompts, filling `cache`.

        Rows whose prompts differ much in length (one picture and two, a short question and a
        long one) run in groups (`prefill_groups`), each forward only as wide as its group's
        longest prompt: the padding columns a group skips stay zero in the cache and masked out.
        The positions are those of the full width, so decoding goes on exactly as after one
        forward over the whole batch."""
        groups = prefill_groups(mask.sum(dim=1).tolist()) if mask is not None and cache is not None else []
        if len(groups) <= 1:
            return self(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache,
                        use_cache=cache is not None, logits_to_keep=1).logits[:, -1]
        B, T = mask.shape
        logits = None
        for rows, width in groups:
            rows = torch.tensor(rows, device=embeds.device)
            part = KVCache(len(self.layers), cache.capacity)
            part.length = T - width   # the columns left out: padding in every row of the group
            out = self(inputs_embeds=embeds[rows, T - width:], attention_mask=mask[rows], past_key_values=part,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
            if logits is None:
                logits = out.new_empty(B, out.shape[-1])
            logits[rows] = out
            cache.take_rows(rows, part, B)
        cache.length = T
        return logits

    def _step_function(self, tokens, position, cache, pad_mask):
        """The decoding step `generate` calls, as `compile_decoding` chose: f(tokens, position)."""
        self.refresh_stacked()
        compiled = self.__dict__.get("_compiled_step")

        def compiled_or_eager(*args):
            nonlocal compiled
            if compiled is not None:
                try:
                    return compiled(*args)
                except Exception as e:   # compiling failed: the step itself is the same in eager
                    warnings.warn(f"torch.compile of the decoding step failed, decoding eagerly: {e}")
                    # Once only: neither this generation's later tokens nor later generations retry.
                    compiled = self.__dict__["_compiled_step"] = None
            return self.decode_step(*args)

        step = self.decode_step if compiled is None else compiled_or_eager
        if self.__dict__.get("_cuda_graph") and tokens.is_cuda:
            return CUDAGraphStep(step, tokens, position, cache, pad_mask)
        return lambda tokens, position: step(tokens, position, cache, pad_mask)

    @torch.inference_mode()   # also around every resumption of the generator (stream=True)
    def _generate_steps(self, input_ids, attention_mask, embeds, image_positions, max_new_tokens, temperature,
                        top_k, top_p, repetition_penalty, eos_token_id, use_cache) -> Iterator[torch.Tensor]:
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        max_len = self.config.max_seq_len
        B, T = input_ids.shape
        # Without left padding no mask is needed at all: skip building and growing one per step.
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        seen = None
        if repetition_penalty != 1.0:
            seen = prompt_tokens(input_ids, self.config.vocab_size, attention_mask, image_positions)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        cache = pad_mask = step = None
        if use_cache:
            # Room for the prompt and the first tokens; it doubles when full. A fixed-shape step
            # attends over the whole capacity, so sizing it for max_new_tokens up front would make
            # every step of a short answer pay for the longest one.
            cache = KVCache(len(self.layers), min(max(64, 1 << T.bit_length()), max_len))
            if mask is not None:
                pad_mask = F.pad(mask.bool(), (0, max_len - T), value=True)
        position = torch.tensor([T], device=input_ids.device)   # where the next token goes
        # Compiled steps and CUDA graphs need the same shapes at every step: `decode_step`, which
        # attends over the cache's whole capacity under a mask. Eager, attending over just the
        # filled positions without a mask is faster (docs/decode_speed.md).
        fixed_shapes = self.__dict__.get("_compiled_step") is not None or bool(
            self.__dict__.get("_cuda_graph") and input_ids.is_cuda)
        # The batch rows still being decoded (None: all of them). Eager, rows that have finished
        # leave the batch (see `rows_to_keep`): the logits, cache, masks and `seen` below
        # then hold only the `live` rows, in this order.
        live = None
        logits = self._prefill(embeds, mask, cache)
        for n in range(max_new_tokens):
            logits = logits.float()
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            next_tok = sample_next(logits, temperature, top_k, top_p)
            if B > 1:   # rows that have finished get eos until the last one finishes
                if live is not None:
                    next_tok = next_tok.new_full((B,), eos).index_copy_(0, live, next_tok)
                next_tok = torch.where(finished, torch.full_like(next_tok, eos), next_tok)
                finished |= next_tok == eos
            yield next_tok[:, None]
            # One row stops at its eos: a plain comparison. Between two compiled decoding steps
            # each tensor op costs ~25 us on the CPU; skipping four saves 0.07-0.1 ms a token
            # (docs/decode_speed.md).
            if n + 1 == max_new_tokens or (bool(finished.all()) if B > 1 else int(next_tok) == eos):
                return
            if T + n + 1 > max_len:
                raise ValueError(f"sequence of {T + n + 1} tokens exceeds max_seq_len={max_len}")
            keep = None if B == 1 or fixed_shapes else rows_to_keep(finished if live is None else finished[live])
            if keep is not None:   # everything that holds one row per live row follows
                live = keep if live is None else live[keep]
                if cache is not None:
                    cache.keep_rows(keep)
                mask = mask[keep] if mask is not None else None
                seen = seen[keep] if seen is not None else None
                embeds = embeds if use_cache else embeds[keep]
            fed = next_tok if live is None else next_tok[live]
            if seen is not None:
                seen[torch.arange(len(fed), device=seen.device), fed] = True
            if use_cache and fixed_shapes:
                if T + n == cache.capacity:   # full: a new shape, so a CUDA graph is captured again
                    cache.grow(min(2 * cache.capacity, max_len))
                    step = None
                if step is None:
                    step = self._step_function(fed[:, None], position, cache, pad_mask)
                logits = step(fed[:, None], position)
                position += 1
            else:   # eager: the new token over the filled cache, or without a cache the whole sequence
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(len(fed), 1)], dim=1)
                new = self.tok_embeddings(fed[:, None])
                embeds = new if use_cache else torch.cat([embeds, new], dim=1)
                logits = self(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, use_cache=use_cache,
                              logits_to_keep=1).logits[:, -1]


class CUDAGraphStep:
    """A decoding step captured once as a CUDA graph, then replayed for every token. The graph
    holds the addresses of its tensors: the cache's buffers and masks stay put for the whole
    generation, and each call copies the new token and position into the graph's own inputs.
    The logits it returns are overwritten by the next call."""

    def __init__(self, step, tokens, position, cache, pad_mask):
        self.tokens, self.position = tokens.clone(), position.clone()
        # Run it once outside the graph first (on a side stream, as capture requires): lazy
        # initialisation, cuBLAS workspaces, compilation. That run writes into the cache exactly
        # what the first replay writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(self.tokens, self.position, cache, pad_mask)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.tokens, self.position, cache, pad_mask)

    def __call__(self, tokens, position):
        self.tokens.copy_(tokens)
        self.position.copy_(position)
        self.graph.replay()
        return self.logits


# What one more prefill forward costs beyond its rows' work, counted in prompt positions: a
# group of rows is split off only when that saves more padding than this. On the safe side: on
# this project's CPU a forward's fixed cost was that of about 60-90 positions of the demo model
# (a decoding step against a position of a batched prefill); on a GPU, launch-bound, it is more.
PREFILL_GROUP_COST = 256


def prefill_groups(lengths: List[int], group_cost: int = PREFILL_GROUP_COST) -> List[tuple]:
    """[(row indices, width)]: the rows (by prompt length) cut into groups of similar lengths
    so that the positions a prefill computes, each group as wide as its longest prompt, plus
    `group_cost` per group, are fewest. Exact: a shortest-path over the distinct lengths."""
    rows_of_width = Counter(lengths)
    widths = sorted(rows_of_width)
    # best[j]: the cheapest way to cover the rows of the j shortest lengths; cut[j]: where its
    # last group starts.
    best, cut = [0] + [math.inf] * len(widths), [0] * (len(widths) + 1)
    for end in range(1, len(widths) + 1):
        rows = 0
        for start in range(end - 1, -1, -1):
            rows += rows_of_width[widths[start]]
            cost = best[start] + rows * widths[end - 1] + group_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(widths)
    while end:
        start = cut[end]
        members = set(widths[start:end])
        groups.append(([i for i, n in enumerate(lengths) if n in members], widths[end - 1]))
        end = start
    return groups[::-1]


def rows_to_keep(done: torch.Tensor) -> Optional[torch.Tensor]:
    """Batched generation: the positions of the rows still decoding, once at least a quarter of
    the rows decoded so far are `done` (else None: all rows go on). A finished row would
    otherwise go through every later step for nothing, the longest answer of a batch setting
    its number of steps. Waiting for a quarter bounds the copies of the cache that dropping
    rows costs: at most 12 for a batch of 64, each leaving every later step at least a quarter
    fewer rows. Not for fixed-shape steps (compiled, CUDA graphs), where a new batch size would
    mean compiling or capturing again."""
    if 4 * int(done.sum()) < len(done):
        return None
    return (~done).nonzero()[:, 0]


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float):
    """Reject settings that would silently do nothing or crash mid-generation (NaN, bad k)."""
    problems = []
    if max_new_tokens < 0:
        problems.append(f"max_new_tokens must be >= 0, not {max_new_tokens}")
    if not temperature >= 0:
        problems.append(f"temperature must be >= 0 (0 is greedy), not {temperature}")
    if top_k < 0:
        problems.append(f"top_k must be >= 0 (0 is off), not {top_k}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1], not {top_p}")
    if not repetition_penalty > 0:
        problems.append(f"repetition_penalty must be > 0 (1 is off), not {repetition_penalty}")
    if problems:
        raise ValueError("; ".join(problems))


def prompt_tokens(input_ids, vocab_size: int, attention_mask=None, image_positions=None) -> torch.Tensor:
    """[B, vocab] bool: the text tokens present in each prompt (padding and pictures excluded)."""
    counted = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        counted &= attention_mask.bool()
    if image_positions is not None:
        counted &= ~image_positions
    seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.long, device=input_ids.device)
    seen.scatter_add_(1, input_ids, counted.long())
    return seen > 0


def apply_repetition_penalty(logits, seen, penalty: float):
    """Make already-seen tokens less likely: divide positive logits, multiply negative ones
    (dividing a negative logit would make the token *more* likely)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits, temperature: float, top_k: int, top_p: float):
    if temperature <= 0:
        # The same index as argmax (the first of equal maxima), in a third of the time for a
        # batch of rows on the CPU: 0.1 instead of 0.3-0.4 ms per step at batch 64, 6400 words.
        return logits.max(dim=-1).indices
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the best one always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]
