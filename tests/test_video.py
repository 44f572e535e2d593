"""model/video.py: which frames come back, from which sources, and how bad inputs fail.

Clips are generated here: frame k shows k in binary as 8 black/white stripes, which survive
H.264 exactly enough to read the index back from any decoded frame.
"""
import io
import re
import subprocess
import sys
import wave

import av
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from model import video
from model.video import VideoError, read_keyframes, write_video

SIZE = 64


def stripes(k, size=SIZE):
    """Frame k: bit b of k sets stripe b white."""
    frame = np.zeros((size, size, 3), np.uint8)
    width = size // 8
    for b in range(8):
        if k >> b & 1:
            frame[:, b * width:(b + 1) * width] = 255
    return frame


def index_of(image):
    grey = np.asarray(image).mean(axis=2)
    width = grey.shape[1] // 8
    return sum(1 << b for b in range(8)
               if grey[:, b * width + 2:(b + 1) * width - 2].mean() > 128)


def clip(n, fps=8):
    buffer = io.BytesIO()
    write_video([stripes(k) for k in range(n)], buffer, fps=fps)
    return buffer.getvalue()


def expected(n_clip, n_frames):
    """Centre of segment i lies in frame floor((i + 0.5) * F / N) of a constant-rate clip."""
    return [(2 * i + 1) * n_clip // (2 * n_frames) for i in range(n_frames)]


def write_with_av(path, n, fmt, fps=8, options=None, container_options=None):
    """A clip in a container write_video does not make (no duration in the header, etc.)."""
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as out:
        stream = out.add_stream("libx264", rate=fps, options={"g": str(fps), **(options or {})})
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for k in range(n):
            frame = av.VideoFrame.from_ndarray(stripes(k), format="rgb24")
            frame.pts = k
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


@pytest.fixture
def count_seeks(monkeypatch):
    calls = []
    real = video._seek

    def counted(*args):
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(video, "_seek", counted)
    return calls


@pytest.mark.parametrize("n_clip,n_frames", [(8, 4), (10, 4), (12, 5), (7, 7), (5, 1), (9, 2)])
def test_frames_are_the_ones_at_the_centres_of_equal_segments(n_clip, n_frames):
    images = read_keyframes(clip(n_clip), n_frames)
    assert len(images) == n_frames
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (SIZE, SIZE)
               for im in images)
    assert [index_of(im) for im in images] == expected(n_clip, n_frames)


def test_path_bytes_and_file_objects_give_identical_frames(tmp_path):
    data = clip(10)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)

    class OneWay(io.RawIOBase):  # an upload stream that cannot seek
        def __init__(self):
            self.inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            chunk = self.inner.read(len(buffer))
            buffer[:len(chunk)] = chunk
            return len(chunk)

    moved = io.BytesIO(data)
    moved.seek(123)  # read from the start regardless, like an upload that was hashed first
    with open(path, "rb") as handle:
        sources = [path, str(path), data, bytearray(data), memoryview(data), moved, handle,
                   OneWay()]
        results = [[np.asarray(im) for im in read_keyframes(s, 3)] for s in sources]
    assert [index_of(a) for a in results[0]] == expected(10, 3)
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("n_frames", [2, 3, 4, 7, 13])
def test_seeking_and_sequential_decoding_give_the_same_frames(n_frames, count_seeks):
    data = clip(100, fps=25)  # 4 s, a codec keyframe every second, B-frames
    sequential = read_keyframes(data, n_frames, _strategy="sequential")
    assert count_seeks == []
    seeking = read_keyframes(data, n_frames, _strategy="seek")
    assert len(count_seeks) >= min(n_frames, 4) - 1
    assert [index_of(im) for im in sequential] == expected(100, n_frames)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(sequential, seeking))


def test_auto_seeks_only_when_targets_are_far_apart(count_seeks):
    data = clip(100, fps=25)
    assert [index_of(im) for im in read_keyframes(data, 3)] == expected(100, 3)
    assert len(count_seeks) == 2  # targets 1.33 s apart: the 2nd and 3rd are sought
    count_seeks.clear()
    assert [index_of(im) for im in read_keyframes(data, 8)] == expected(100, 8)
    assert count_seeks == []  # 0.5 s apart: decoding forward is cheaper


def test_a_single_codec_keyframe_stops_seeking_but_frames_stay_exact(tmp_path, count_seeks):
    path = write_with_av(tmp_path / "one_gop.mp4", 100, "mp4", fps=25,
                         options={"g": "250", "sc_threshold": "0"})  # no scene-cut keyframes
    auto = read_keyframes(path, 3)
    assert len(count_seeks) == 1  # landed on frame 0: no further seeks
    forced = read_keyframes(path, 3, _strategy="seek")
    assert [index_of(im) for im in auto] == [index_of(im) for im in forced] == expected(100, 3)


def test_variable_frame_rate_is_sampled_in_time_not_by_count(tmp_path):
    # Frame 5 is shown from tick 5 to 20 (its own duration is 1 tick): 21 ticks in all.
    ticks = [0, 1, 2, 3, 4, 20]
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w", format="mp4") as out:
        # No B-frames: with them the MP4 muxer derives the header duration from decode times.
        stream = out.add_stream("libx264", rate=8, options={"bf": "0"})
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for k, tick in enumerate(ticks):
            frame = av.VideoFrame.from_ndarray(stripes(k), format="rgb24")
            frame.pts = tick
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    # Targets at 21 * (2i + 1) / 8 ticks = 2.6, 7.9, 13.1, 18.4: frame 4 is on screen for the
    # last three (held, not missing, so no error).
    for strategy in ("sequential", "seek"):
        images = read_keyframes(path, 4, _strategy=strategy)
        assert [index_of(im) for im in images] == [2, 4, 4, 4]
    assert [index_of(im) for im in read_keyframes(path, 1)] == [4]


@pytest.mark.parametrize("fmt,suffix", [("matroska", "mkv"), ("h264", "h264")])
def test_clips_without_duration_in_the_header_are_decoded_to_find_it(tmp_path, fmt, suffix):
    path = write_with_av(tmp_path / f"clip.{suffix}", 10, fmt)
    with av.open(str(path)) as container:
        assert not container.streams.video[0].duration  # the case under test
    assert [index_of(im) for im in read_keyframes(path, 4)] == expected(10, 4)
    assert [index_of(im) for im in read_keyframes(path, 10)] == list(range(10))
    with pytest.raises(VideoError, match=r"clip\.\w+ has 10 frames, fewer than the 11 asked for"):
        read_keyframes(path, 11)


def test_asking_for_every_frame_or_more(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip(3))
    assert [index_of(im) for im in read_keyframes(path, 3)] == [0, 1, 2]
    with pytest.raises(VideoError) as error:
        read_keyframes(path.read_bytes(), 4, name="clip.mp4")
    assert str(error.value) == "clip.mp4 has 3 frames, fewer than the 4 asked for"
    with pytest.raises(VideoError, match="has 3 frames"):
        read_keyframes(path, 4, _strategy="seek")
    with pytest.raises(VideoError, match=f"^{path}: n_frames must be at least 1"):
        read_keyframes(path, 0)


def bad_inputs(tmp_path):
    png = tmp_path / "picture.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(png)
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 50)
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.RandomState(0).bytes(5000))
    data = clip(40)
    cut = tmp_path / "cut.mp4"  # the index (moov) is written last: cut off
    cut.write_bytes(data[:len(data) // 2])
    fast = write_with_av(tmp_path / "fast.mp4", 40, "mp4",
                         container_options={"movflags": "+faststart"})
    cut_fast = tmp_path / "cut_fast.mp4"  # index first, frames cut off
    cut_fast.write_bytes(fast.read_bytes()[:len(fast.read_bytes()) * 2 // 3])
    avi = write_with_av(tmp_path / "whole.avi", 40, "avi").read_bytes()
    cut_avi = tmp_path / "cut.avi"  # header says 5 s, frames stop early
    cut_avi.write_bytes(avi[:len(avi) * 4 // 5])
    sound = tmp_path / "sound.wav"
    with wave.open(str(sound), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(bytes(8000))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    unreadable = "is not a readable video"
    return {png: "is a PNG image, not a video",
            text: "is text, not a video|is not a readable video",  # bytes: no .txt hint
            noise: unreadable, cut: unreadable, empty: unreadable,
            cut_fast: "is corrupt or truncated", cut_avi: "truncated",
            sound: "has no video stream",
            tmp_path / "missing.mp4": unreadable + r" \(No such file"}


@pytest.mark.parametrize("ffmpeg_logging", [None, av.logging.ERROR])
def test_bad_inputs_fail_with_one_line_naming_the_file(tmp_path, capfd, ffmpeg_logging):
    previous = av.logging.get_level()
    av.logging.set_level(ffmpeg_logging)  # ERROR: as torchvision sets it on import
    try:
        for path, problem in bad_inputs(tmp_path).items():
            sources = [(path, str(path))]
            if path.exists():
                sources += [(path.read_bytes(), "upload.bin"), (open(path, "rb"), str(path))]
            for source, label in sources:
                with pytest.raises(VideoError) as error:
                    read_keyframes(source, 2, name="upload.bin" if label == "upload.bin" else None)
                if hasattr(source, "close"):
                    source.close()
                message = str(error.value)
                assert "\n" not in message and message.startswith(label), message
                assert re.search(problem, message), message
    finally:
        av.logging.set_level(previous)
    assert capfd.readouterr() == ("", "")


def test_write_video_round_trips_demo_pictures_through_bytesio():
    frames = []
    for k in range(12):
        image = Image.new("RGB", (224, 224), (238, 236, 230))
        image.paste((220, 40, 40), (20 + 12 * k, 60, 60 + 12 * k, 100))
        image.paste((40, 90, 200), (100, 130, 140, 170))
        frames.append(image)
    buffer = io.BytesIO()
    write_video(frames[:6] + [np.asarray(f) for f in frames[6:]], buffer, fps=8)
    assert buffer.getvalue()[4:8] == b"ftyp"
    back = read_keyframes(io.BytesIO(buffer.getvalue()), 12)
    errors = np.stack([np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
                       for a, b in zip(frames, back)])
    assert all(im.size == (224, 224) for im in back)
    assert errors.mean() < 1 and np.percentile(errors, 99) <= 10


def test_write_video_odd_sizes_and_bad_frames(tmp_path):
    odd = [np.full((33, 65, 3), 40 * k, np.uint8) for k in range(3)]
    write_video(odd, tmp_path / "odd.mp4")
    back = read_keyframes(tmp_path / "odd.mp4", 3)
    assert [im.size for im in back] == [(65, 33)] * 3
    assert [round(np.asarray(im).mean() / 40) for im in back] == [0, 1, 2]
    with pytest.raises(ValueError, match="one size"):
        write_video([stripes(0), stripes(0, size=32)], io.BytesIO())
    with pytest.raises(ValueError, match="at least one frame"):
        write_video([], io.BytesIO())
    with pytest.raises(ValueError, match="uint8"):
        write_video([np.zeros((8, 8, 3))], io.BytesIO())


def test_without_pyav_pictures_still_load_and_a_clip_fails_in_one_line():
    """A machine without PyAV (a GPU box given only torch) still imports the data pipeline, so
    it trains on pictures; a clip is a VideoError that names the missing package."""
    code = ("import sys; sys.modules['av'] = None\n"   # makes `import av` fail as if not installed
            "import dataset.vlm_dataset\n"
            "from model.video import VideoError, read_keyframes\n"
            "try:\n    read_keyframes(b'not read', name='clip.mp4')\n"
            "except VideoError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clip.mp4: videos need PyAV, which is not installed (pip install av)"
