"""The demo's vision encoder: a small, randomly initialised CLIP saved like the real one.

The demo has no downloaded weights, so `make_demo_clip` writes a folder with the same files
and the same input as openai/clip-vit-base-patch32 (224-px pictures, 32-px patches, 50 tokens),
which the real loading code then reads. It is a stand-in, good only for the demo's pictures.
"""
import json
import os

from model.config import DEMO_VISION_MODEL as DEMO_CLIP_PATH

from .pictures import IMAGE_SIZE, VERSION

# Far above CLIP's 0.02 initialisation, so every token says where its patch is (see make_demo_clip).
DEMO_CLIP_POSITION_STD = 1.0


def make_demo_clip(path=DEMO_CLIP_PATH, seed=0, hidden_size=512, num_layers=1,
                   position_std=DEMO_CLIP_POSITION_STD, force=False):
    """Save a small randomly initialised CLIP (plus image processor) laid out like the real one.

    The encoder stays frozen in the demo, so random weights just have to keep colour, shape and
    position apart. The patch embedding is a random linear map of each 32x32 patch, so each of
    the 49 patch tokens keeps what its patch shows (tests check that pictures differing only in
    colour give clearly different features). Width matters more than depth: a wider random map
    keeps more of each patch, including the few corner pixels that tell a circle from a square,
    while random layers only add a near-uniform attention average to the residual stream, so
    one layer is enough.
    Position embeddings are drawn with `position_std` instead of CLIP's 0.02. At 0.02 they are
    ~1% of a patch embedding, so a token would say what its patch shows but hardly where it is,
    and the LLM would have to tell left from right by the token's index alone. A trained CLIP
    learns strong position embeddings; this stands in. See docs/demo_notes.md.
    """
    # Recorded in config.json so a folder made with other settings is rebuilt, not reused.
    recipe = {"version": VERSION, "seed": seed, "hidden_size": hidden_size, "num_layers": num_layers,
              "position_std": position_std}
    files = [os.path.join(path, f) for f in ("config.json", "preprocessor_config.json", "model.safetensors")]
    if not force and all(map(os.path.isfile, files)):
        with open(files[0], encoding="utf-8") as f:
            if json.load(f).get("demo_clip_recipe") == recipe:
                return path  # checked before importing torch, so reuse is instant

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()  # before the imports below, which warn too
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        # The text tower is unused; it is here (tiny) so the folder is a complete CLIPModel.
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=1024, max_position_embeddings=77),
        vision_config=dict(hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=max(1, hidden_size // 64),
                           image_size=IMAGE_SIZE, patch_size=32),
        projection_dim=min(hidden_size, 128),
        demo_clip_recipe=recipe,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.normal_(0.0, position_std)
    os.makedirs(path, exist_ok=True)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar for 2 MB
    model.save_pretrained(path)
    if bars:
        transformers.utils.logging.enable_progress_bar()
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(path)
    return path
