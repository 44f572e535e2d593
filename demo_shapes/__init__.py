"""The offline demo's material: pictures of coloured shapes, questions about them, a demo CLIP.

demo.py uses it to show, on a CPU in minutes, that the VLM pipeline learns: a frozen, randomly
initialised tiny CLIP (`make_demo_clip`) feeds a tiny LLM trained on generated pictures in the
original MiniMind-V data formats (`generate_demo_data`), and its answers to held-out pictures
are scored (`score_answer`).

    pictures.py  scenes, drawing, PNG files
    clips.py     short clips of one moving (or still) shape, their questions, MP4 files
    records.py   questions and answers, the four record sets, the manifest
    encoder.py   the random demo CLIP
    scoring.py   reading facts out of an answer and scoring it
    __main__.py  the command line: python -m demo_shapes

Demo-only: nothing in model/, dataset/ or trainer/ imports it.
"""
from .clips import CLIP_FILES, CLIP_QTYPES, MOTIONS, generate_clip_data, render_clip, sample_clip
from .encoder import make_demo_clip
from .pictures import (COLOUR_JITTER, COLOURS, POSITIONS, SHAPES, VERSION, render_scene, sample_scene,
                       shape_polygon)
from .records import FILES, HELDOUT_QTYPES, MANIFEST, MULTI_QUESTIONS, generate_demo_data
from .scoring import (colours_in, counts_in, motions_in, names_colour_and_shape, positions_in, score_answer,
                      shapes_in)

__all__ = [
    "CLIP_FILES", "CLIP_QTYPES", "COLOUR_JITTER", "COLOURS", "FILES", "HELDOUT_QTYPES", "MANIFEST", "MOTIONS",
    "MULTI_QUESTIONS", "POSITIONS", "SHAPES", "VERSION", "colours_in", "counts_in", "generate_clip_data",
    "generate_demo_data", "make_demo_clip", "motions_in", "names_colour_and_shape", "positions_in",
    "render_clip", "render_scene", "sample_clip", "sample_scene", "score_answer", "shape_polygon", "shapes_in",
]
