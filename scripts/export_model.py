"""Export MiniMind-V weights as a transformers model folder (loaded with trust_remote_code).

    python scripts/export_model.py --weight out/512_vlm_sft.pth --out_dir out/minimind-v-512-hf

The folder holds config.json (with `auto_map`), model.safetensors, the tokenizer and the model
code (copies of model/config.py, language.py, vlm.py, vision.py plus modeling_minimind_v.py), so

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

runs our own code offline. The CLIP tower is not copied: its folder is recorded in the config
(`vision_model_path`, an absolute path; override it when loading elsewhere). 3-eval_chat.py and
web_server.py accept the folder as --weight too.
"""
import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model.checkpoint import EXPORT_PREFIX, atomic_output  # noqa: E402
from model.config import size_tag  # noqa: E402
from model.inference import UserError, is_export, load_model, resolve_weights  # noqa: E402
from model.prompt import TOKENIZER_DIR  # noqa: E402

MODEL_CODE = ["config.py", "language.py", "vlm.py", "vision.py"]
REMOTE_CODE = os.path.join(ROOT, "scripts", "hf_remote_code", "modeling_minimind_v.py")
AUTO_MAP = {"AutoConfig": "config.VLMConfig",
            "AutoModelForCausalLM": "modeling_minimind_v.MiniMindVForCausalLM"}


def export(weights: str, out_dir: str = None, vision_model_path: str = None) -> str:
    """Write the export folder (default out/minimind-v-{tag}-hf) and return its path."""
    from safetensors.torch import save_file

    model = load_model(weights, vision_model_path)   # checks the weights and the CLIP width
    config = model.config
    config.vision_model_path = os.path.abspath(config.vision_model_path)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["MiniMindVForCausalLM"]
    out_dir = out_dir or os.path.join(ROOT, "out", f"minimind-v-{config.tag}-hf")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file, not a folder")
    if os.path.realpath(weights) == os.path.realpath(out_dir):
        raise UserError(f"--out_dir {out_dir} is the folder being exported: choose another")
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    # The output matrix is the embedding matrix: stored once, tied again on loading.
    state = {EXPORT_PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items()
             if k != "output.weight"}
    with atomic_output(os.path.join(out_dir, "model.safetensors")) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    for name in MODEL_CODE:
        shutil.copy(os.path.join(ROOT, "model", name), os.path.join(out_dir, name))
    shutil.copy(REMOTE_CODE, os.path.join(out_dir, os.path.basename(REMOTE_CODE)))
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), os.path.join(out_dir, name))
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Export MiniMind-V weights as a transformers folder.")
    p.add_argument("--weight", default="sft",
                   help="pretrain | sft | sft_multi, a .pth file or a published v1 folder")
    p.add_argument("--weights_dir", default="out", help="where --weight NAME is looked up")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--use_moe", action="store_true")
    p.add_argument("--out_dir", default=None, help="default: out/minimind-v-{dim}[_moe]-hf")
    p.add_argument("--vision_model", default=None, help="CLIP folder to record in the config")
    args = p.parse_args(argv)
    try:
        weights = resolve_weights(args.weight, args.weights_dir, size_tag(args.dim, args.use_moe))
        if is_export(weights):   # a published v1 folder is welcome: this gives it our code
            raise UserError(f"{weights} is already an exported folder")
        out_dir = export(weights, args.out_dir, args.vision_model)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:   # a folder that cannot be written, a full disk
        print(f"error: cannot write {e.filename or args.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"exported {weights} -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
