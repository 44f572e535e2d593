"""Video input: a clip becomes N evenly spaced RGB frames, each then treated as one picture
(50 visual tokens each), the way MiniCPM-V reads video. Decoding is done with PyAV (FFmpeg).

The sampling rule ("keyframes" here means the sampled frames, not the codec's I-frames):
the clip spans from its first frame's timestamp `start` to the end of its last frame `end`
(the stream duration from the header when there is one, else the last frame's timestamp plus
its duration). That span is cut into N equal segments and keyframe i is the frame on screen
at the centre of segment i: the last frame whose timestamp is <= start + (i + 0.5) * D / N,
D = end - start. For a constant-rate clip of F frames that is frame floor((i + 0.5) * F / N):
N = F gives every frame once, and neither the first nor the last frame (often a fade or a
black frame) is favoured. The rule is about timestamps, not frame counts, so a
variable-frame-rate clip is sampled evenly in time, and it is computed with exact fractions
so a target that falls exactly on a frame boundary always picks the same frame.

How the frames are fetched does not change which frames they are (tested): a target less
than a second ahead is reached by decoding forward, a further one by seeking to the codec
keyframe before it and decoding forward from there. So short clips, or many frames from one
clip, are decoded once front to back (stopping after the last target), while a few frames
from a long clip skip most of it. If a seek lands no further on than decoding forward would
have been (codec keyframes further apart than the targets), that clip seeks no more. When the
header states no duration (WebM from a browser, raw .h264), the clip is decoded once to learn
its timestamps and again to fetch the frames; when seeking fails, it is read without.

Every failure is a VideoError (a ValueError) with a one-line message naming the file.
"""
import io
import math
import os
from fractions import Fraction
from typing import BinaryIO, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from model.prompt import DEFAULT_FRAMES

try:
    import av
except ImportError:   # pictures need no PyAV: a machine without it trains on them; only clips fail
    av = None

__all__ = ["VIDEO_EXTENSIONS", "VideoError", "read_keyframes", "write_video"]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")

VideoSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]

# Targets further apart than this are reached by seeking; closer ones by decoding forward,
# which is cheaper than a seek when codec keyframes are a second or more apart (the usual).
_SEEK_GAP = Fraction(1)
# Demuxers that hand a single picture or a text file to FFmpeg as a "video".
_TEXT_FORMATS = {"tty", "bin", "xbin", "adf", "idf"}


class VideoError(ValueError):
    """A clip that cannot be read: not a video, corrupt, truncated or too short."""


class _SeekFailed(Exception):
    """Seeking is unusable for this clip; it is read sequentially instead."""


def read_keyframes(source: VideoSource, n_frames: int = DEFAULT_FRAMES, name: Optional[str] = None, *,
                   _strategy: str = "auto") -> List[Image.Image]:
    """`n_frames` RGB images evenly spaced over the clip (rule in the module docstring), in
    time order, at the clip's own size.

    `source` is a path, the file's bytes, or a binary file object (read from its start).
    `name` labels the clip in error messages (default: the path, or the file object's name).
    `_strategy` ("auto", "seek" or "sequential") is for tests and benchmarks.
    """
    label = name or _label(source)
    _need_pyav(label)
    if n_frames < 1:
        raise VideoError(f"{label}: n_frames must be at least 1, got {n_frames}")
    if _strategy not in ("auto", "seek", "sequential"):
        raise ValueError(f"unknown strategy {_strategy!r}")
    source = _rewindable(source)
    # PyAV keeps FFmpeg's log off unless someone turned it on (torchvision does); capturing
    # keeps our bad inputs from printing through the logging module even then.
    with av.logging.Capture():
        try:
            if _strategy != "sequential":
                try:
                    return _read(source, n_frames, label, _strategy)
                except (_SeekFailed, av.error.FFmpegError, OSError):
                    pass  # read again without seeking: succeeds, or names the real problem
            return _read(source, n_frames, label, "sequential")
        except (av.error.FFmpegError, OSError) as e:  # OSError: from a file object's seek
            raise VideoError(f"{label} is corrupt or truncated ({_reason(e)})") from None


def write_video(frames: Sequence[Union[Image.Image, np.ndarray]],
                destination: Union[str, "os.PathLike[str]", BinaryIO], fps: float = 8) -> None:
    """Write RGB frames (PIL images or HxWx3 uint8 arrays, all one size) as an MP4 to a path
    or a writable, seekable binary file object such as io.BytesIO.

    H.264 (libx264, CRF 18, "visually lossless"): flat-colour pictures come back within a few
    levels except on colour edges, where 4:2:0 chroma is shared by 2x2 pixels (mean error
    ~0.2/255; MPEG-4 Part 2 errs twice as much in ~30% bigger files), and yuv420p plays in every
    browser, which 4:4:4 does not. 4:2:0 needs even sides, so odd-sized frames use yuv444p.
    A codec keyframe every second keeps seeking useful on long clips.
    """
    _need_pyav(_label(destination))
    arrays = [_rgb_array(f) for f in frames]
    if not arrays:
        raise ValueError("write_video needs at least one frame")
    height, width = arrays[0].shape[:2]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"all frames must have one size; the first is {width}x{height}")
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    with av.logging.Capture(), av.open(destination, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate, options={
            "crf": "18", "g": str(max(1, round(rate)))})
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        for i, array in enumerate(arrays):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def _need_pyav(label: str) -> None:
    if av is None:
        raise VideoError(f"{label}: videos need PyAV, which is not installed (pip install av)")


def _read(source, n_frames: int, label: str, strategy: str) -> List[Image.Image]:
    # A gap of 0 seeks before every target (forced); None never seeks.
    seek_gap = {"auto": _SEEK_GAP, "seek": Fraction(0), "sequential": None}[strategy]
    count = None
    with _open(source, label) as container:
        stream = _video_stream(container, label)
        end = _header_end(stream)
        if end is not None:
            picked = _walk(container, stream, n_frames, end, seek_gap, label)
        else:
            count, end = _scan(container, stream, label)
    if count is not None:  # no duration in the header: the first pass found it, fetch now
        if count < n_frames:
            raise VideoError(_too_short(label, count, n_frames))
        with _open(source, label) as container:
            stream = _video_stream(container, label)
            picked = _walk(container, stream, n_frames, end, None, label)
    if count is None and len({time for time, _ in picked}) < n_frames:
        # Two targets on one frame: the clip is shorter than asked, or a frame is held long
        # (variable frame rate). Only an exact count tells which.
        count = _count(source, label)
        if count < n_frames:
            raise VideoError(_too_short(label, count, n_frames))
    return [image for _, image in picked]


def _walk(container, stream, n_frames: int, end: Fraction, seek_gap: Optional[Fraction],
          label: str):
    """(time, RGB image) of the frame on screen at each target, decoding forward and seeking
    when a target is more than `seek_gap` ahead of the next frame."""
    frames = _timed(container.decode(stream), stream)
    current = next(frames, None)
    if current is None:
        raise VideoError(f"{label} has no decodable video frames")
    start = current[0]
    if end <= start:
        raise VideoError(f"{label} has a video stream that ends before it starts")
    upcoming = next(frames, None)
    picked = []
    for i in range(n_frames):
        target = start + (2 * i + 1) * (end - start) / (2 * n_frames)
        if seek_gap is not None and upcoming is not None and target - upcoming[0] > seek_gap:
            position = upcoming[0]
            current, frames = _seek(container, stream, target, start)
            upcoming = next(frames, None)
            if seek_gap and current[0] <= position:
                seek_gap = None  # codec keyframes are further apart than the targets
        while upcoming is not None and upcoming[0] <= target:
            current, upcoming = upcoming, next(frames, None)
        if upcoming is None and target >= current[0] + 2 * _frame_duration(current[1], stream):
            raise VideoError(f"{label} is truncated: its frames stop at {float(current[0]):.2f} s"
                             f" but its header says {float(end):.2f} s")
        if picked and picked[-1][0] == current[0]:
            picked.append((current[0], picked[-1][1].copy()))
        else:
            picked.append((current[0], current[1].to_image()))
    return picked


def _seek(container, stream, target: Fraction, start: Fraction):
    """Decode from the codec keyframe at or before `target`: (first frame, later frames)."""
    back = Fraction(0)
    while True:
        at = max(target - back, start)
        try:
            container.seek(math.floor(at / stream.time_base), stream=stream, backward=True)
        except av.error.FFmpegError:
            raise _SeekFailed() from None
        frames = _timed(container.decode(stream), stream)
        first = next(frames, None)
        if first is None or first[1].pts is None:
            raise _SeekFailed()
        if first[0] <= target:
            return first, frames
        if at == start:
            raise _SeekFailed()
        # Some demuxers index keyframes by decode time, which can lie a little before the
        # frame's display time: step back until the landing frame is not past the target.
        back = max(2 * back, Fraction(1))


def _timed(frames, stream):
    """(time in seconds as an exact Fraction, frame) for each decoded frame. Raw streams
    (a bare .h264) carry no timestamps: those frames follow the previous one."""
    time = previous = None
    for frame in frames:
        if frame.pts is not None:
            time = frame.pts * stream.time_base
        else:
            time = Fraction(0) if time is None else time + _frame_duration(previous, stream)
        previous = frame
        yield time, frame


def _frame_duration(frame, stream) -> Fraction:
    if frame.duration:
        return frame.duration * stream.time_base
    return 1 / Fraction(stream.average_rate or 25)


def _header_end(stream) -> Optional[Fraction]:
    """End of the stream per its header, when the header states a duration."""
    if stream.duration and stream.start_time is not None and stream.time_base:
        return (stream.start_time + stream.duration) * stream.time_base
    return None


def _scan(container, stream, label: str):
    """Decode everything: (frame count, end of the last frame)."""
    count, last = 0, None
    for last in _timed(container.decode(stream), stream):
        count += 1
    if last is None:
        raise VideoError(f"{label} has no decodable video frames")
    return count, last[0] + _frame_duration(last[1], stream)


def _count(source, label: str) -> int:
    with _open(source, label) as container:
        stream = _video_stream(container, label)
        return sum(1 for _ in container.decode(stream))


def _open(source, label: str):
    if hasattr(source, "read"):
        source.seek(0)
    try:
        return av.open(source, metadata_errors="ignore")
    except (av.error.FFmpegError, OSError) as e:
        raise VideoError(f"{label} is not a readable video ({_reason(e)})") from None


def _video_stream(container, label: str):
    fmt = container.format.name
    streams = [s for s in container.streams.video
               if not s.disposition & av.stream.Disposition.attached_pic]  # cover art
    playable = [s for s in container.streams if s.codec_context is not None]
    if fmt in _TEXT_FORMATS:
        raise VideoError(f"{label} is text, not a video")
    if fmt == "image2" or fmt.endswith("_pipe"):
        kind = fmt[:-len("_pipe")].upper() if fmt.endswith("_pipe") else "still"
        raise VideoError(f"{label} is a {kind} image, not a video")
    if not streams or streams[0].codec_context is None:
        if playable:
            raise VideoError(f"{label} has no video stream")
        # e.g. an MP4 cut off before or inside its index
        raise VideoError(f"{label} is not a readable video (no readable streams; truncated?)")
    return streams[0]


def _rewindable(source):
    """Paths stay paths; bytes and one-way streams become BytesIO, which can be reread."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    if hasattr(source, "read"):
        seekable = getattr(source, "seekable", None)
        return source if seekable and seekable() else io.BytesIO(source.read())
    return os.fspath(source)


def _label(source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<video bytes>"
    if hasattr(source, "read"):
        file_name = getattr(source, "name", None)
        return file_name if isinstance(file_name, str) else "<video file>"
    return os.fspath(source)


def _reason(error: Exception) -> str:
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return " ".join(str(text).split())


def _too_short(label: str, count: int, n_frames: int) -> str:
    return (f"{label} has {count} frame{'s' if count != 1 else ''}, "
            f"fewer than the {n_frames} asked for")


def _rgb_array(frame) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"a frame must be an HxWx3 uint8 RGB array, got {array.dtype} "
                         f"{array.shape}")
    return np.ascontiguousarray(array)
