"""Scoring the model's answers to held-out demo questions.

An answer is right when it states the expected fact and nothing contradicting it; the wording
is free ("红色。", "是红的" and "红颜色" all name red). The facts are read out of the text by
keyword: `colours_in`, `shapes_in`, `positions_in`, `counts_in` and `motions_in` list what a
text mentions.
"""
import re

from .pictures import COLOURS

_COLOUR_WORDS = {name[0]: name for name in COLOURS}  # "红" also catches "红的", "红颜色"
_SHAPE_WORDS = {"圆": "圆形", "正方": "正方形", "方形": "正方形", "方块": "正方形", "三角": "三角形"}
_POSITION_WORDS = {"左上": "左上", "右上": "右上", "左下": "左下", "右下": "右下",
                   "中间": "中间", "中央": "中间", "正中": "中间", "中心": "中间"}
_NUMBER_WORDS = {**{str(d): d for d in range(10)},
                 **{c: i for i, c in enumerate("零一二三四五六七八九十")}, "两": 2, "俩": 2}
_OPPOSITE = {"左": "右", "右": "左", "上": "下", "下": "上"}
# A clip's motion (clips.MOTIONS): "从左往右", "从左到右", "向右" ... all say left to right.
_MOTION_WORDS = {
    **{f"从{a}{via}{b}": f"从{a}往{b}" for a, b in _OPPOSITE.items() for via in "往向到至"},
    **{f"{via}{b}": f"从{a}往{b}" for a, b in _OPPOSITE.items() for via in "往向朝"},
    **{w: "没有移动" for w in ("没有移动", "没移动", "没有动", "没动", "不动", "静止", "原地")},
}
# Words whose numeral characters are not counts.
_NOT_COUNTS = re.compile("三角|一样|一种|同一|第[一二两12]|[一两12]张|一下|一共|一起")


# ----------------------------------------------------------------------------- word matching

def _mentions(text, words):
    """Values of `words` (keyword -> value) found in `text`, in order of appearance."""
    pattern = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
    return [words[m.group(0)] for m in re.finditer(pattern, text)]


def colours_in(text):
    return _mentions(text, _COLOUR_WORDS)


def shapes_in(text):
    return _mentions(text, _SHAPE_WORDS)


def positions_in(text):
    return _mentions(text, _POSITION_WORDS)


def motions_in(text):
    return _mentions(text, _MOTION_WORDS)


def counts_in(text):
    return _mentions(_NOT_COUNTS.sub(" ", text), _NUMBER_WORDS)


def _verdict(text):
    """True for "same", False for "different", None when the answer does not say."""
    if re.search("不一样|不同|不相同|不是|不一致", text):
        return False
    if re.search("一样|相同|一致|都是|都有", text):
        return True
    return None


def _states(found, expected):
    """The answer names the expected value and nothing contradicting it."""
    return len(found) > 0 and set(found) == {expected}


# ----------------------------------------------------------------------------- scores

def score_answer(record, answer_text):
    """Does `answer_text` state the right fact for a held-out record?"""
    a, text = record["attrs"], answer_text.strip()
    qtype = record["qtype"]
    if qtype == "colour":
        return _states(colours_in(text), a["colour"])
    if qtype == "shape":
        return _states(shapes_in(text), a["shape"])
    if qtype == "position":
        return _states(positions_in(text), a["position"])
    if qtype == "count":
        return _states(counts_in(text), a["count"])
    if qtype == "caption":
        ok = (_states(colours_in(text), a["colour"]) and _states(shapes_in(text), a["shape"])
              and _states(counts_in(text), a["count"]))
        # A position is not required, but a wrong one (or one for several shapes) is an error.
        positions = positions_in(text)
        return ok and (not positions or (a["count"] == 1 and set(positions) == {a["position"]}))
    if qtype == "multi":
        return _score_multi(a, text)
    if qtype == "direction":   # a clip's (clips.py); its "shape" question is scored as a picture's
        return _states(motions_in(text), a["motion"])
    raise ValueError(f"unknown qtype {qtype!r}")


def names_colour_and_shape(record, answer_text):
    """The pretrain-caption target: the caption names the right colour and the right shape."""
    a = record["attrs"]
    return (_states(colours_in(answer_text), a["colour"])
            and _states(shapes_in(answer_text), a["shape"]))


def _score_multi(a, text):
    first, second = a["images"]
    if a["mtype"] == "which":
        # The conclusion is what counts: the part after the last "所以" (so), if any.
        conclusion = text.rsplit("所以", 1)[-1]
        said = _mentions(conclusion, {"第一": 0, "第1": 0, "第二": 1, "第2": 1, "两张": -1, "都": -1})
        return said != [] and set(said) == {a["target"]}
    key = a["mtype"][len("same_"):]
    find = {"shape": shapes_in, "colour": colours_in, "count": counts_in}[key]
    same = first[key] == second[key]
    if _verdict(text) != same:
        return False
    # Any values the answer adds must be the right ones, in picture order.
    found = find(text)
    return not found or found == [first[key], second[key]] or (same and found == [first[key]])
