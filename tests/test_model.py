"""The core model: published checkpoint layout, splice, generation, vision hook, MoE."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_CLIP_HIDDEN, tiny_config
from model.checkpoint import (CheckpointError, atomic_save, build_vlm, config_from_state_dict,
                              load_weights, model_state_dict, read_state_dict)
from model.config import IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER_IDS, VLMConfig
from model.language import RMSNorm, apply_repetition_penalty, one_query_attention, prompt_tokens, sample_next
from model.prompt import count_placeholders, encode_chat_prompt, encode_conversation, encode_text
from model.vision import VisionEncoder
from model.vlm import MiniMindVLM


def published_state_dict(dim, n_layers, bias=True):
    """A synthetic state_dict with exactly the keys and shapes of the published v1 files."""
    hidden = {512: 1408, 768: 2048}[dim]
    kv = dim // 2
    sd = {"tok_embeddings.weight": torch.randn(6400, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = torch.randn(dim, dim)
        sd[p + "attention.wk.weight"] = torch.randn(kv, dim)
        sd[p + "attention.wv.weight"] = torch.randn(kv, dim)
        sd[p + "attention.wo.weight"] = torch.randn(dim, dim)
        sd[p + "attention_norm.weight"] = torch.randn(dim)
        sd[p + "ffn_norm.weight"] = torch.randn(dim)
        sd[p + "feed_forward.w1.weight"] = torch.randn(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = torch.randn(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = torch.randn(hidden, dim)
    sd["norm.weight"] = torch.randn(dim)
    sd["output.weight"] = sd["tok_embeddings.weight"]
    sd["vision_proj.vision_proj.0.weight"] = torch.randn(dim, 768)
    if bias:
        sd["vision_proj.vision_proj.0.bias"] = torch.randn(dim)
    return sd


# ---------------------------------------------------------------- published checkpoint parity
@pytest.mark.parametrize("preset,dim,n_layers,total", [("512", 512, 8, 27_272_192), ("768", 768, 16, 109_340_160)])
def test_published_layout_loads_strictly(tmp_path, preset, dim, n_layers, total):
    sd = published_state_dict(dim, n_layers)
    path = tmp_path / f"{dim}_vlm_sft.pth"
    torch.save(sd, path)
    model = MiniMindVLM(VLMConfig.from_preset(preset))        # built unbiased: the file turns bias on
    assert load_weights(model, str(path)) == "vlm"
    assert model.config.vision_proj_bias
    assert sum(p.numel() for p in model.parameters()) == total
    assert set(model.state_dict()) == set(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert model.config.hidden_dim == {512: 1408, 768: 2048}[dim]
    assert model.config.head_dim == {512: 32, 768: 48}[dim]


def test_llm_param_count_and_llm_only_file(tmp_path, caplog):
    sd = published_state_dict(512, 8)
    llm = {k: v for k, v in sd.items() if not k.startswith("vision_proj")}
    assert sum(v.numel() for k, v in llm.items() if k != "output.weight") == 26_878_464
    torch.save(llm, tmp_path / "512_llm.pth")
    model = MiniMindVLM(VLMConfig.from_preset("512"))
    fresh = model.vision_proj.vision_proj[0].weight.clone()
    with caplog.at_level("INFO", logger="minimind_v"):
        assert load_weights(model, str(tmp_path / "512_llm.pth")) == "llm"
    assert "freshly initialised" in caplog.text
    assert torch.equal(model.vision_proj.vision_proj[0].weight, fresh)
    assert torch.equal(model.layers[3].attention.wq.weight, sd["layers.3.attention.wq.weight"])


def test_old_file_variants_load(tmp_path):
    sd = published_state_dict(512, 8, bias=False)
    old = {"_orig_mod." + k: v for k, v in sd.items()}
    for i in range(8):
        old[f"_orig_mod.layers.{i}.attention.mask"] = torch.full((1, 1, 8, 8), float("-inf")).triu(1)
    torch.save(old, tmp_path / "old.pth")
    model = MiniMindVLM(VLMConfig.from_preset("512"))
    load_weights(model, str(tmp_path / "old.pth"))
    assert not model.config.vision_proj_bias
    assert torch.equal(model.norm.weight, sd["norm.weight"])
    ddp = {"module." + k: v for k, v in sd.items()}
    load_weights(MiniMindVLM(VLMConfig.from_preset("512")), ddp)


def test_wrong_keys_fail_with_names(tmp_path):
    sd = published_state_dict(512, 8)
    sd["layers.0.attention.wq_typo.weight"] = sd.pop("layers.0.attention.wq.weight")
    with pytest.raises(CheckpointError) as err:
        load_weights(MiniMindVLM(VLMConfig.from_preset("512")), sd)
    assert "layers.0.attention.wq.weight" in str(err.value) and "wq_typo" in str(err.value)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_weights(MiniMindVLM(VLMConfig.from_preset("768")), published_state_dict(512, 8))
    torch.save({"model": "not tensors"}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError):
        read_state_dict(str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(str(tmp_path / "nope.pth"))


def test_config_inferred_from_weights():
    cfg = config_from_state_dict(published_state_dict(768, 16))
    assert (cfg.dim, cfg.n_layers, cfg.n_kv_heads, cfg.hidden_dim, cfg.vision_proj_bias) == (768, 16, 8, 2048, True)
    moe = MiniMindVLM(tiny_config(use_moe=True, n_routed_experts=3))
    cfg = config_from_state_dict(moe.state_dict(), n_heads=4)
    assert cfg.use_moe and cfg.n_routed_experts == 3 and cfg.dim == 64


def test_atomic_save_roundtrip_through_real_loader(tmp_path, tiny_clip_dir):
    torch.manual_seed(1)
    model = MiniMindVLM(tiny_config())
    path = tmp_path / "out" / "64_vlm_sft.pth"
    umask = os.umask(0)   # reading the umask means setting it: put it back at once
    os.umask(umask)
    atomic_save(model_state_dict(model), str(path))
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temp file left
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask   # readable as any file (not mkstemp's 0600)
    loaded = build_vlm(str(path), vision_model_path=tiny_clip_dir, n_heads=4)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not any(k.startswith("vision") and "proj" not in k for k in loaded.state_dict())


def test_missing_vision_folder_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="clip-vit-base-patch32"):
        VisionEncoder.from_pretrained(str(tmp_path / "nothing"))


# ---------------------------------------------------------------- tokenizer and prompts
def test_tokenizer_placeholder_ids(tokenizer):
    assert len(tokenizer) == 6400
    assert tokenizer(IMAGE_PLACEHOLDER)["input_ids"] == IMAGE_PLACEHOLDER_IDS
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == "<s>user\nhi</s>\n<s>assistant\nyo</s>\n"


def test_image_mark_after_space_keeps_the_image(tokenizer):
    text = "look at this <image> please"
    # The bug being fixed: writing the placeholder into the text lets " <" merge away.
    naive = tokenizer.encode(text.replace("<image>", IMAGE_PLACEHOLDER), add_special_tokens=False)
    assert count_placeholders(naive, IMAGE_PLACEHOLDER_IDS) == 0
    ids = encode_text(tokenizer, text, IMAGE_PLACEHOLDER_IDS)
    assert count_placeholders(ids, IMAGE_PLACEHOLDER_IDS) == 1
    two = encode_chat_prompt(tokenizer, [{"role": "user", "content": "a <image> b <image>"}], IMAGE_PLACEHOLDER_IDS)
    assert count_placeholders(two, IMAGE_PLACEHOLDER_IDS) == 2


def test_conversation_mask_covers_every_answer(tokenizer):
    msgs = [{"role": "user", "content": "<image>\n这是什么？"}, {"role": "assistant", "content": "一只猫。"},
            {"role": "user", "content": "什么颜色？"}, {"role": "assistant", "content": "黑色。"}]
    ids, mask = encode_conversation(tokenizer, msgs, IMAGE_PLACEHOLDER_IDS)
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "一只猫。</s>黑色。</s>"
    prompt = encode_chat_prompt(tokenizer, msgs[:1], IMAGE_PLACEHOLDER_IDS)
    assert ids[:len(prompt)] == prompt        # training text is exactly what inference sees


# ---------------------------------------------------------------- splice
def test_visual_tokens_land_on_placeholders_only():
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config())
    span = IMAGE_PLACEHOLDER_IDS
    row0 = [5, 6] + span + [7] + span + [8]          # two images
    row1 = [9] * 10 + span + [0] * (len(row0) - 10 - len(span))   # one image, right padding
    row2 = [11] * len(row0)                          # text only
    ids = torch.tensor([row0, row1, row2])
    feats = torch.randn(3, 50, TINY_CLIP_HIDDEN)
    h = model.embed_inputs(ids, image_features=feats)
    proj = model.vision_proj(feats)
    plain = model.tok_embeddings(ids)
    assert torch.allclose(h[0, 2:52], proj[0]) and torch.allclose(h[0, 53:103], proj[1])
    assert torch.allclose(h[1, 10:60], proj[2])
    is_image = torch.zeros_like(ids, dtype=torch.bool)
    is_image[0, 2:52] = is_image[0, 53:103] = is_image[1, 10:60] = True
    assert torch.equal(h[~is_image], plain[~is_image])
    assert torch.equal(model.image_positions(ids), is_image)


def test_placeholder_image_mismatch_is_an_error():
    model = MiniMindVLM(tiny_config())
    ids = torch.tensor([[5] + IMAGE_PLACEHOLDER_IDS, [6] * 51])
    with pytest.raises(ValueError, match="1 image placeholder"):
        model.embed_inputs(ids, image_features=torch.randn(2, 50, TINY_CLIP_HIDDEN))
    assert model.embed_inputs(torch.tensor([[5, 6, 7]])).shape == (1, 3, 64)   # image-free batch


def test_gradients_reach_projector_and_llm_not_clip(tiny_vlm, tokenizer):
    tiny_vlm.train()
    ids = torch.tensor([encode_text(tokenizer, "<image>\n红色圆形", IMAGE_PLACEHOLDER_IDS)] * 2)
    pixels = torch.randn(2, 3, 224, 224)
    loss = tiny_vlm(ids, labels=ids, pixel_values=pixels).loss
    loss.backward()
    assert tiny_vlm.vision_proj.vision_proj[0].weight.grad.abs().sum() > 0
    assert tiny_vlm.layers[0].attention.wq.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_vlm.vision_encoder.parameters())
    assert not tiny_vlm.vision_encoder.clip.training       # frozen tower stays in eval mode
    assert not any("clip" in n for n, _ in tiny_vlm.named_parameters())


# ---------------------------------------------------------------- vision tower
def test_hooked_features_equal_last_hidden_state(tiny_clip_dir):
    from transformers import CLIPVisionModel

    enc = VisionEncoder.from_pretrained(tiny_clip_dir)
    ref = CLIPVisionModel.from_pretrained(tiny_clip_dir).eval()
    pixels = torch.randn(3, 3, 224, 224)
    feats = enc(pixels)
    assert feats.shape == (3, 50, TINY_CLIP_HIDDEN)
    torch.testing.assert_close(feats, ref(pixel_values=pixels).last_hidden_state)
    first = VisionEncoder.from_pretrained(tiny_clip_dir, layer=0)(pixels)
    assert not torch.allclose(first, feats)
    # One batched call equals image-by-image calls.
    torch.testing.assert_close(torch.cat([enc(pixels[i:i + 1]) for i in range(3)]), feats, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "RGB"])
def test_preprocess_any_mode_to_224(tiny_clip_dir, mode):
    enc = VisionEncoder.from_pretrained(tiny_clip_dir)
    img = Image.new("RGB", (300, 120), (255, 0, 0)).convert(mode)
    pixels = enc.preprocess([img, Image.new("RGB", (64, 64))])
    assert pixels.shape == (2, 3, 224, 224)
    assert torch.allclose(pixels[0], pixels[0, :, :1, :1], atol=1e-4)     # one uniform colour
    if mode != "L":
        assert pixels[0, 0, 0, 0] > 1.5 and pixels[0, 2, 0, 0] < -1.0      # red stayed red


def test_squash_keeps_the_whole_picture(tiny_clip_dir):
    img = Image.new("RGB", (448, 224), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 40, 224))         # a red stripe at the far left
    squashed = VisionEncoder.from_pretrained(tiny_clip_dir).preprocess([img])
    cropped = VisionEncoder.from_pretrained(tiny_clip_dir, squash=False).preprocess([img])
    assert squashed[0, 0, 100, 0] > 1.5            # v1 behaviour: the stripe survives
    assert cropped[0, 0, 100, 0] < 0               # centre crop cuts it off


def test_direct_normalisation_equals_the_processor(tiny_clip_dir):
    """The fast path (rescale + normalise in torch) gives the processor's own pixel values, and
    a processor that would do more than that (here: a smaller centre crop) keeps the slow path."""
    enc = VisionEncoder.from_pretrained(tiny_clip_dir)
    pre = enc.preprocess
    assert pre.direct is not None
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((224, 224), (97, 310))]
    squashed = [im.resize((224, 224), Image.BICUBIC) for im in imgs]
    expected = pre.processor(images=squashed, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pre(imgs), expected, atol=1e-5)

    from model.vision import ImagePreprocessor
    cropping = type(pre.processor)(**{**pre.processor.to_dict(), "crop_size": {"height": 200, "width": 200}})
    assert ImagePreprocessor(cropping, 224).direct is None


# ---------------------------------------------------------------- generation
def _prompts(tokenizer, model):
    texts = ["<image>\n这个图片描述的是什么内容？", "你好", "<image>\n<image>\n比较两张图片"]
    return [encode_chat_prompt(tokenizer, [{"role": "user", "content": t}], model.config.image_ids) for t in texts]


@pytest.mark.parametrize("shape", [(1, 1, 512), (64, 1, 128), (2, 37, 768), (3, 64)])
def test_rms_norm_at_inference_gives_the_bits_of_f_rms_norm(shape):
    """Eager inference on the CPU normalises with the plain formula (faster there than
    F.rms_norm): the same bits as F.rms_norm, which training, CUDA and compiled code use, so
    decoding gives the same tokens whichever path ran."""
    g = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    for scale in (1e-3, 1.0, 30.0):
        x = torch.randn(shape, generator=g) * scale
        with torch.no_grad():
            got = norm(x)
        assert got.shape == x.shape
        assert torch.equal(got, F.rms_norm(x, (shape[-1],), norm.weight.detach(), 1e-5))
        assert torch.equal(got, norm(x).detach())   # with gradients: F.rms_norm itself


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 8), (6, 1)])
@pytest.mark.parametrize("mask_kind", ["boolean", "additive", "none"])
def test_one_query_attention_equals_sdpa(heads, kv_heads, mask_kind):
    """Batched decoding steps on the CPU attend through one_query_attention: SDPA's values, with
    each query head reading its own key head, under either kind of mask, on a cache slice."""
    torch.manual_seed(0)
    B, S, D = 5, 19, 16
    q = torch.randn(B, 1, heads, D).transpose(1, 2)                    # as the model makes them
    k, v = (torch.randn(B, kv_heads, S + 7, D)[:, :, :S] for _ in range(2))   # a cache's filled part
    keep = torch.rand(B, 1, 1, S) > 0.3
    keep[..., -1] = True                                                 # a row always sees itself
    mask = {"boolean": keep, "additive": torch.where(keep, 0.0, float("-inf")), "none": None}[mask_kind]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    assert torch.allclose(one_query_attention(q, k, v, mask), expected, atol=1e-6)


def test_kv_cache_matches_full_recompute(tiny_vlm, tokenizer):
    ids = torch.tensor([_prompts(tokenizer, tiny_vlm)[0]])
    pixels = torch.randn(1, 3, 224, 224)
    kw = dict(max_new_tokens=20, eos_token_id=-1, pixel_values=pixels)
    cached = tiny_vlm.generate(ids, use_cache=True, **kw)
    full = tiny_vlm.generate(ids, use_cache=False, **kw)
    assert cached.shape == (1, 20)                       # max_new_tokens counts NEW tokens
    assert torch.equal(cached, full)


def test_decoding_steps_grow_the_cache_without_changing_tokens(tiny_vlm, tokenizer):
    """`generate` starts with a small cache and doubles it when full (a new shape for the
    decoding step): left-padded rows across two doublings decode as a full recompute does."""
    prompts = _prompts(tokenizer, tiny_vlm)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(attention_mask=mask, max_new_tokens=80, eos_token_id=-1, pixel_values=torch.randn(3, 3, 224, 224))
    assert width + 80 > 2 * 64                       # past the first capacity, twice
    cached = tiny_vlm.generate(ids, use_cache=True, **kw)
    assert torch.equal(cached, tiny_vlm.generate(ids, use_cache=False, **kw))


def test_fixed_shape_decoding_step_gives_the_forward_logits(tiny_vlm, tokenizer):
    """`decode_step`, what compiled decoding and CUDA graphs run, gives the logits of a full
    forward at every step: left-padded rows, a cache that doubles twice on the way."""
    import torch.nn.functional as F
    from model.language import KVCache

    prompts = _prompts(tokenizer, tiny_vlm)
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    pixels = torch.randn(3, 3, 224, 224)
    new = tiny_vlm.generate(ids, attention_mask=mask, max_new_tokens=80, eos_token_id=-1, pixel_values=pixels)
    full_ids = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    with torch.inference_mode():
        tiny_vlm.refresh_stacked()
        cache = KVCache(len(tiny_vlm.layers), 64)
        tiny_vlm(ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache, use_cache=True)
        pad_mask = F.pad(mask.bool(), (0, tiny_vlm.config.max_seq_len - T), value=True)
        position = torch.tensor([T])
        for n in range(new.shape[1] - 1):
            if T + n == cache.capacity:
                cache.grow(2 * cache.capacity)
            step = tiny_vlm.decode_step(new[:, n:n + 1], position, cache, pad_mask)
            position += 1
            if n % 10 == 0 or T + n + 1 in (64, 128):
                full = tiny_vlm(full_ids[:, :T + n + 1], attention_mask=full_mask[:, :T + n + 1],
                                pixel_values=pixels).logits[:, -1]
                assert torch.allclose(step, full, atol=1e-4), n
    assert cache.capacity == 256


def test_a_failed_compile_falls_back_to_eager_once(tiny_vlm, tokenizer):
    """Should torch.compile fail (no C++ compiler, ...), decoding warns once and goes on
    eagerly with the same tokens: neither later tokens nor a later generation try again."""
    prompts = _prompts(tokenizer, tiny_vlm)
    ids = torch.tensor([prompts[0]])
    kw = dict(max_new_tokens=80, eos_token_id=-1, pixel_values=torch.randn(1, 3, 224, 224))
    eager = tiny_vlm.generate(ids, **kw)
    attempts = []

    def failing_compile(*args):
        attempts.append(args)
        raise RuntimeError("no C++ compiler")

    tiny_vlm.__dict__["_compiled_step"] = failing_compile   # what compile_decoding(True, False) sets
    with pytest.warns(UserWarning, match="decoding eagerly") as warned:
        first = tiny_vlm.generate(ids, **kw)
    second = tiny_vlm.generate(ids, **kw)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert len(attempts) == 1 and len(warned) == 1


def test_inference_copies_follow_weight_changes(tiny_vlm, tokenizer):
    """Without gradients the stacked (q/k/v, gate/up) and output matmuls read transposed copies
    of the weights. The copies must follow every change of the weights (in place, as an
    optimizer step does; load_state_dict) and never become state_dict keys."""
    ids = torch.tensor([_prompts(tokenizer, tiny_vlm)[0]])
    pixels = torch.randn(1, 3, 224, 224)
    original = {k: v.clone() for k, v in tiny_vlm.state_dict().items()}

    def copies_and_weights():
        with torch.no_grad():
            through_copies = tiny_vlm(ids, pixel_values=pixels).logits
        with torch.enable_grad():   # gradients on: the weights themselves, as in training
            through_weights = tiny_vlm(ids, pixel_values=pixels).logits.detach()
        assert torch.allclose(through_copies, through_weights, atol=1e-5)
        return through_copies

    before = copies_and_weights()
    with torch.no_grad():
        for name, p in tiny_vlm.named_parameters():
            if name.startswith(("layers.", "tok_embeddings")):
                p.mul_(1.5)
    changed = copies_and_weights()
    assert not torch.allclose(changed, before, atol=1e-3)
    tiny_vlm.load_state_dict(original)
    assert torch.allclose(copies_and_weights(), before, atol=1e-6)
    assert set(tiny_vlm.state_dict()) == set(original)


def test_prefill_groups_are_the_cheapest_cut():
    """prefill_groups against every way to cut the sorted distinct lengths into groups."""
    import itertools
    import random
    from model.language import prefill_groups

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([3, 5, 40, 41, 90, 200]) for _ in range(rng.randint(1, 12))]
        cost = rng.choice([0, 16, 256])
        widths = sorted(set(lengths))

        def positions(groups):
            return sum(len(rows) * width + cost for rows, width in groups)

        best = min(positions([([i for i, n in enumerate(lengths) if lo <= n <= hi], hi)
                              for lo, hi in zip([widths[0]] + [widths[c] for c in cuts],
                                                [widths[c - 1] for c in cuts] + [widths[-1]])])
                   for k in range(len(widths))
                   for cuts in itertools.combinations(range(1, len(widths)), k))
        groups = prefill_groups(lengths, cost)
        assert sorted(i for rows, _ in groups for i in rows) == list(range(len(lengths)))
        assert all(max(lengths[i] for i in rows) == width for rows, width in groups)
        assert positions(groups) == best


def test_prefill_in_groups_equals_one_forward(tiny_vlm, tokenizer):
    """Short text-only prompts batched with a long two-picture one: the prefill runs in two
    groups, and its logits, its cache at every real position and the answers that follow equal
    those of one forward over the whole padded batch, and those of each prompt alone."""
    from model.inference import pad_left
    from model.language import KVCache, prefill_groups

    _, hello, long = _prompts(tokenizer, tiny_vlm)
    prompts = [hello] * 5 + [long]
    ids, mask = pad_left(prompts)
    pixels = torch.randn(2, 3, 224, 224)
    assert len(prefill_groups(mask.sum(dim=1).tolist())) == 2
    with torch.inference_mode():
        tiny_vlm.refresh_stacked()
        embeds = tiny_vlm.embed_inputs(ids, pixels)
        grouped_cache, whole_cache = KVCache(len(tiny_vlm.layers), 256), KVCache(len(tiny_vlm.layers), 256)
        grouped = tiny_vlm._prefill(embeds, mask, grouped_cache)
        whole = tiny_vlm(inputs_embeds=embeds, attention_mask=mask, past_key_values=whole_cache, use_cache=True,
                         logits_to_keep=1).logits[:, -1]
    assert torch.allclose(grouped, whole, atol=1e-5)
    assert grouped_cache.length == whole_cache.length == ids.shape[1]
    real = mask.bool()[:, None, :, None]
    for a, b in zip(grouped_cache.keys + grouped_cache.values, whole_cache.keys + whole_cache.values):
        T = ids.shape[1]
        assert torch.allclose(a[:, :, :T] * real, b[:, :, :T] * real, atol=1e-5)
    kw = dict(max_new_tokens=12, eos_token_id=-1)
    batched = tiny_vlm.generate(ids, attention_mask=mask, pixel_values=pixels, **kw)
    assert torch.equal(batched[0], tiny_vlm.generate(torch.tensor([prompts[0]]), **kw)[0])
    assert torch.equal(batched[-1], tiny_vlm.generate(torch.tensor([long]), pixel_values=pixels, **kw)[0])


def test_kv_cache_grows_past_its_capacity(tiny_vlm, tokenizer):
    """A cache sized too small (here 4 positions) must grow without changing any logit."""
    from model.language import KVCache
    ids = torch.tensor([_prompts(tokenizer, tiny_vlm)[0]])
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        full = tiny_vlm(ids, pixel_values=pixels).logits
        cache = KVCache(len(tiny_vlm.layers), capacity=4)
        prompt_len = ids.shape[1] - 5
        first = tiny_vlm(ids[:, :prompt_len], pixel_values=pixels, past_key_values=cache, use_cache=True).logits
        steps = [tiny_vlm(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                 for t in range(prompt_len, ids.shape[1])]
    assert cache.length == ids.shape[1] and cache.keys[0].shape[2] >= ids.shape[1]
    assert torch.allclose(torch.cat([first] + steps, dim=1), full, atol=1e-5)


def test_batched_generation_equals_one_by_one(tiny_vlm, tokenizer):
    prompts = _prompts(tokenizer, tiny_vlm)
    n_imgs = [1, 0, 2]
    pixels = torch.randn(3, 3, 224, 224)
    singles, start = [], 0
    for p, n in zip(prompts, n_imgs):
        singles.append(tiny_vlm.generate(torch.tensor([p]), max_new_tokens=12, eos_token_id=-1,
                                         pixel_values=pixels[start:start + n] if n else None)[0])
        start += n
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])            # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = tiny_vlm.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=-1, pixel_values=pixels)
    for row, single in zip(batched, singles):
        assert torch.equal(row, single)


@pytest.mark.parametrize("use_cache,penalty", [(True, 1.0), (True, 1.3), (False, 1.0)])
def test_finished_rows_leave_the_batch(tiny_vlm, tokenizer, use_cache, penalty):
    """A row that has reached its eos is dropped from the later steps (cache, masks and the
    repetition penalty's record follow), and every row's tokens stay those of one by one."""
    prompts = _prompts(tokenizer, tiny_vlm)
    kw = dict(max_new_tokens=12, repetition_penalty=penalty, use_cache=use_cache)
    pixels = torch.randn(3, 3, 224, 224)                      # 1, 0 and 2 pictures
    per_row = [pixels[:1], None, pixels[1:]]
    singles = [tiny_vlm.generate(torch.tensor([p]), pixel_values=px, eos_token_id=-1, **kw)[0].tolist()
               for p, px in zip(prompts, per_row)]
    eos = singles[0][2]                     # row 0 ends with its third token
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    rows_per_call = []
    hook = tiny_vlm.layers[0].register_forward_pre_hook(lambda _, args: rows_per_call.append(args[0].shape[0]))
    try:
        batched = tiny_vlm.generate(ids, attention_mask=mask, pixel_values=pixels, eos_token_id=eos, **kw)
    finally:
        hook.remove()
    assert batched.shape[1] > 3                               # another row went on after row 0 ended
    assert rows_per_call[-1] < len(prompts)                   # ... and its last step left row 0 out
    for row, single in zip(batched.tolist(), singles):
        end = single.index(eos) + 1 if eos in single else len(single)
        assert row == single[:end] + [eos] * (len(row) - end)


def test_streaming_and_eos_stop(tiny_vlm, tokenizer):
    ids = torch.tensor([_prompts(tokenizer, tiny_vlm)[1]])
    whole = tiny_vlm.generate(ids, max_new_tokens=15, eos_token_id=-1)
    streamed = torch.cat(list(tiny_vlm.generate(ids, max_new_tokens=15, eos_token_id=-1, stream=True)), dim=1)
    assert torch.equal(whole, streamed)
    eos = int(whole[0, 4])   # pretend the 5th greedy token is the end of sequence
    assert tiny_vlm.generate(ids, max_new_tokens=15, eos_token_id=eos).shape[1] <= 5


def test_repetition_penalty_lowers_negative_and_positive_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_repetition_penalty_skips_image_placeholder(tiny_vlm, tokenizer):
    def penalised(text):
        ids = torch.tensor([encode_text(tokenizer, text, IMAGE_PLACEHOLDER_IDS)])
        return prompt_tokens(ids, tiny_vlm.config.vocab_size, image_positions=tiny_vlm.image_positions(ids))

    text_ids = set(tokenizer.encode("\n<>", add_special_tokens=False))
    assert set(penalised("<image>\n<>")[0].nonzero().flatten().tolist()) == text_ids
    assert not penalised("<image>\n你好")[0, 30]


def test_sampling_filters():
    torch.manual_seed(0)
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]]).repeat(200, 1)
    assert set(sample_next(logits, 1.0, top_k=2, top_p=1.0).tolist()) <= {0, 1}
    assert set(sample_next(logits, 1.0, top_k=0, top_p=0.5).tolist()) == {0}
    assert sample_next(logits, 0.0, 0, 1.0).tolist() == [0] * 200


def test_greedy_picks_argmax_and_the_first_of_equal_maxima():
    torch.manual_seed(0)
    logits = torch.randn(64, 6400)
    logits[:, 7] = logits[:, 4000] = logits.max() + 1      # a tie in every row: the first wins
    logits[1:8] = torch.randn(7, 6400)
    picked = sample_next(logits, 0.0, 0, 1.0)
    assert torch.equal(picked, logits.argmax(dim=-1))
    assert picked[0].item() == 7 and picked[8:].eq(7).all()


def test_optimizer_decays_matrices_only_and_is_fused_on_the_cpu():
    """configure_optimizer: AdamW over the trainable parameters only, weight decay on matrices
    only, and the fused kernel on the CPU, whose steps match the default (for-each) AdamW's up
    to float rounding."""
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config())
    model.tok_embeddings.requires_grad_(False)
    opt = model.configure_optimizer(weight_decay=0.1, learning_rate=1e-2)
    decayed, plain = opt.param_groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in decayed["params"] + plain["params"]} == {id(p) for p in trainable}
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    assert decayed["fused"] is True

    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = MiniMindVLM(tiny_config())
    reference.load_state_dict(before)
    reference.tok_embeddings.requires_grad_(False)
    ref_opt = torch.optim.AdamW([{"params": [p for p in reference.parameters() if p.requires_grad and p.dim() == 2],
                                  "weight_decay": 0.1},
                                 {"params": [p for p in reference.parameters() if p.requires_grad and p.dim() == 1],
                                  "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    ids = torch.randint(40, 6400, (2, 12))
    for m, o in ((model, opt), (reference, ref_opt)):
        for _ in range(3):
            o.zero_grad()
            m(ids, labels=ids).loss.backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(model.layers[0].attention.wq.weight, before["layers.0.attention.wq.weight"])


# ---------------------------------------------------------------- MoE
def test_moe_trains_and_generates():
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(use_moe=True))
    keys = set(model.state_dict())
    assert "layers.0.feed_forward.gate.weight" in keys and "layers.1.feed_forward.experts.3.w2.weight" in keys
    assert any(re.match(r"layers\.0\.feed_forward\.shared_experts\.w1", k) for k in keys)
    ids = torch.randint(40, 6400, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(ids, labels=ids)
        cross_entropy = F.cross_entropy(out.logits, ids[:, 1:].reshape(-1))
        assert out.loss > cross_entropy + 1e-4          # the balancing loss is part of training
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] * 0.7
    model.eval()
    assert model.generate(ids[:1], max_new_tokens=6, eos_token_id=-1).shape == (1, 6)
    with torch.no_grad():
        out = model(ids, labels=ids)     # no balancing loss at inference
    assert out.loss == pytest.approx(float(F.cross_entropy(out.logits, ids[:, 1:].reshape(-1))), rel=1e-6)


def test_head_split_of_a_weight_file_comes_from_the_matching_preset():
    """Weight files carry no config: a demo-sized file gets the demo preset's 4 / 2 heads, any
    other size MiniMind's 16 / 8 (so the published files keep loading)."""
    from model.language import MiniMindLM
    demo = config_from_state_dict(MiniMindLM(VLMConfig.from_preset("demo")).state_dict())
    assert (demo.n_heads, demo.n_kv_heads) == (4, 2)
    other = config_from_state_dict(MiniMindLM(VLMConfig(dim=96, n_layers=1)).state_dict())
    assert (other.n_heads, other.n_kv_heads) == (16, 8)
