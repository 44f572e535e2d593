"""MiniMind-V in the browser: upload pictures and chat about them.

    streamlit run web_server.py
    python web_server.py            # the same (v1's way); Streamlit options work with both

Environment variables (all optional): MINIMIND_OUT_DIR (where weights and exported folders
are looked for, default out/), MINIMIND_VISION_MODEL (CLIP folder; default: chosen from the
weights), MINIMIND_EVAL_IMAGES (sample pictures), MINIMIND_DEVICE (default cuda if available),
MINIMIND_COMPILE=1 (compiled decoding, as 3-eval_chat.py --compile).
"""
import argparse
import hashlib
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

import streamlit as st  # noqa: E402
from streamlit import runtime  # noqa: E402

if __name__ == "__main__" and not runtime.exists():
    # `python web_server.py`, as v1's web demo was started: run it the way Streamlit apps run.
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", os.path.abspath(__file__), *sys.argv[1:]]
    sys.exit(cli.main())

import torch  # noqa: E402

from model.config import device_name  # noqa: E402
from model.inference import (  # noqa: E402
    DEFAULT_QUESTION, EVAL_IMAGES, WEIGHTS_HINT, Sampling, UserError, count_parameters, find_checkpoints,
    list_files, load_model, stream_answer)
from model.prompt import DEFAULT_FRAMES  # noqa: E402
from model.video import VIDEO_EXTENSIONS, VideoError, read_keyframes  # noqa: E402
from model.vision import ImageError, load_image  # noqa: E402

VIDEO_TYPES = [e.lstrip(".") for e in VIDEO_EXTENSIONS]

OUT_DIR = os.environ.get("MINIMIND_OUT_DIR", os.path.join(ROOT, "out"))
VISION_MODEL = os.environ.get("MINIMIND_VISION_MODEL") or None
SAMPLES_DIR = os.environ.get("MINIMIND_EVAL_IMAGES", EVAL_IMAGES)
DEVICE = os.environ.get("MINIMIND_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
COMPILE = os.environ.get("MINIMIND_COMPILE", "") not in ("", "0")   # as 3-eval_chat.py --compile


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def get_model(weights: str, vision_model: str, device: str):
    # Once per process and checkpoint; sessions share it (generation keeps no state on the model).
    # Two stay loaded (say pretrain and SFT, compared back and forth); a third pushes out the
    # oldest rather than every checkpoint ever picked holding its memory, CLIP included.
    return load_model(weights, vision_model, device, COMPILE)


@st.cache_resource
def get_tokenizer():
    from model.prompt import load_tokenizer

    return load_tokenizer()


def sidebar():
    """Checkpoint choice and decoding settings -> (weights path, Sampling)."""
    st.sidebar.header("Model")
    checkpoints = find_checkpoints(OUT_DIR)
    if not checkpoints:
        st.warning(f"No MiniMind-V weights in `{OUT_DIR}`: {WEIGHTS_HINT}. "
                   f"(`MINIMIND_OUT_DIR` points the app at another folder.)")
        st.stop()
    weights = st.sidebar.selectbox("Weights", checkpoints, format_func=lambda p: os.path.relpath(p, OUT_DIR))
    d = Sampling()
    st.sidebar.header("Sampling")
    sampling = Sampling(
        temperature=st.sidebar.slider("Temperature (0 = greedy)", 0.0, 1.5, d.temperature, 0.05,
                                      key="temperature"),
        top_k=st.sidebar.number_input("Top-k (0 = off)", 0, 6400, d.top_k, key="top_k"),
        top_p=st.sidebar.slider("Top-p", 0.05, 1.0, d.top_p, 0.05, key="top_p"),
        repetition_penalty=d.repetition_penalty,
        max_new_tokens=st.sidebar.slider("Max new tokens", 16, 2048, d.max_new_tokens, 16,
                                         key="max_new_tokens"))
    frames = st.sidebar.slider("Keyframes per clip", 1, 8, DEFAULT_FRAMES, key="frames")
    if st.sidebar.button("New chat"):
        st.session_state.history = []
    return weights, sampling, frames


def pictures():
    """Uploaded and sample pictures as [(name, image)]; a file that is not a picture gets an
    error message and is left out."""
    uploads = st.file_uploader("Pictures", accept_multiple_files=True,
                               type=["png", "jpg", "jpeg", "webp", "bmp", "gif"])
    samples = {}
    if os.path.isdir(SAMPLES_DIR):
        samples = {os.path.basename(p): p for p in list_files([SAMPLES_DIR])}
    chosen = st.multiselect("…or sample pictures", list(samples))
    found = []
    for name, source in [(f.name, f) for f in uploads or []] + [(n, samples[n]) for n in chosen]:
        try:
            found.append((name, load_image(source, name=name)))
        except ImageError as e:
            st.error(str(e))
    return found


@st.cache_data(show_spinner="Reading the clip…", max_entries=4)
def keyframes(data: bytes, name: str, n_frames: int):
    return read_keyframes(data, n_frames, name=name)


def clip(n_frames):
    """An uploaded clip's keyframes as [(label, image)], or None; a file that is not a readable
    clip (or has too few frames) gets an error message."""
    upload = st.file_uploader("…or a video (asked about through its keyframes)", type=VIDEO_TYPES)
    if upload is None:
        return None
    try:
        frames = keyframes(upload.getvalue(), upload.name, n_frames)
    except VideoError as e:
        st.error(str(e))
        return None
    return [(f"{upload.name} · frame {k + 1}/{n_frames}", frame) for k, frame in enumerate(frames)]


def main():
    st.set_page_config(page_title="MiniMind-V", page_icon="🖼️")
    st.title("MiniMind-V")
    st.caption("A tiny vision-language model: ask it about your pictures, or a clip.")
    weights, sampling, frames = sidebar()
    try:
        device_name(DEVICE)   # the check the command lines' --device gets
    except argparse.ArgumentTypeError as e:
        st.error(f"MINIMIND_DEVICE: {e}")
        st.stop()
    try:
        model = get_model(weights, VISION_MODEL, DEVICE)
    except UserError as e:
        st.error(str(e))
        st.stop()
    st.sidebar.caption(f"{count_parameters(model) / 1e6:.1f}M parameters (+ frozen CLIP) · {DEVICE}")

    shown = pictures()
    video = clip(frames)
    if video is not None:
        if shown:
            st.info("A clip and pictures were given: the chat is about the clip.")
        shown = video
    if shown:
        st.image([im for _, im in shown], caption=[n for n, _ in shown], width=120 if video else 160)
    # A new set of pictures starts a new conversation: the history is about the old ones.
    key = hashlib.sha1(repr([(n, im.resize((8, 8)).tobytes()) for n, im in shown]).encode()).hexdigest()
    if st.session_state.get("pictures_key") != key:
        st.session_state.pictures_key = key
        st.session_state.history = []
    history = st.session_state.setdefault("history", [])

    for message in history:
        st.chat_message(message["role"]).markdown(message["content"])
    question = st.chat_input("Ask about the clip, e.g. 形状往哪个方向移动？" if video is not None
                             else f"Ask about the picture, e.g. {DEFAULT_QUESTION}")
    if question:
        st.chat_message("user").markdown(question)
        with st.chat_message("assistant"):
            try:
                reply = st.write_stream(stream_answer(model, get_tokenizer(), [im for _, im in shown],
                                                      question, history, sampling, clip=video is not None))
            except UserError as e:
                st.error(str(e))
                return
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


main()
