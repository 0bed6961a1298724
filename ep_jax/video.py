"""Reading videos: files, folders of frames and arrays to sampled RGB frames with their times.

- Files (mp4, webm, mkv, gif, anything FFmpeg reads) are decoded with PyAV (`av`, imported only
  when a file is read). A missing file, a file that is not a video (FFmpeg cannot open it, or it
  has no video stream), a truncated or damaged file (FFmpeg stops before the frames it announced,
  or an mkv/webm's segment runs past the end of the file) and a video with fewer than 2 frames
  are refused with one `ProcessingError` naming the file.
- A folder of frames: its image files in name order, read with `ep_jax.image_files.load_image`,
  all of one size; an array [T, H, W, 3] (uint8, or anything `load_image` takes per frame). Both
  are taken as frames `source_fps` apart (default: the sampling rate, i.e. every frame is used).

Sampling is transformers' `Qwen2VLVideoProcessor.sample_frames` with `fps`: about `fps` frames per
second of video, at least `min_frames` and at most `max_frames` (and never more than the video
has), rounded down to an even count (the model's temporal patches are 2 frames), uniformly over
the video: frame `floor(k * total / n)` for k < n (exact integers, so the choice is deterministic).
`Video.sampled_fps` is transformers' `VideoMetadata.sampled_fps` (n / total * source fps), from
which the processor derives `second_per_grid_ts`.

Memory: only the sampled frames are decoded (files) or read (folders), into one array. Before
that, their size at full resolution (n x H x W x 3 bytes) is checked against `max_bytes`
(default: half of this machine's memory): a long high-resolution video is refused with one
`ProcessingError` saying how much it needs and what to lower, instead of exhausting memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ep_jax.errors import ProcessingError
from ep_jax.image_files import load_image

DEFAULT_FPS = 2.0  # Qwen2.5-VL's sampling rate (qwen-vl-utils)
MIN_FRAMES, MAX_FRAMES = 4, 768  # transformers' Qwen2VLVideoProcessor bounds
TEMPORAL_PATCH = 2
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".gif", ".mov", ".avi", ".m4v")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Video:
    frames: np.ndarray  # uint8 [n, H, W, 3]: the sampled frames
    timestamps: np.ndarray  # float64 [n]: time of each sampled frame in seconds
    indices: np.ndarray  # int64 [n]: which source frames were sampled
    total_frames: int  # frames in the source
    source_fps: float  # frame rate of the source
    source: str  # file name, folder, or "array"
    read_s: float = 0.0  # time spent reading and decoding

    @property
    def sampled_fps(self) -> float:
        """transformers' `VideoMetadata.sampled_fps`: n / total * source fps."""
        return len(self.indices) / self.total_frames * self.source_fps

    @property
    def num_frames(self) -> int:
        return int(len(self.frames))


def sample_indices(total: int, source_fps: float, *, fps: float = DEFAULT_FPS, min_frames: int = MIN_FRAMES,
                   max_frames: int = MAX_FRAMES, temporal_patch: int = TEMPORAL_PATCH,
                   label: str = "video") -> np.ndarray:
    """Which of `total` frames to keep (module docstring)."""
    check_fps(fps)
    if total < temporal_patch:
        raise ProcessingError(f"{label} has {total} frame(s); a video needs at least {temporal_patch}")
    top = math.floor(min(max_frames, total) / temporal_patch) * temporal_patch
    n = min(max(total / source_fps * fps, min_frames), top, total)
    n = max(temporal_patch, math.floor(n / temporal_patch) * temporal_patch)
    return (np.arange(n, dtype=np.int64) * total) // n


def check_fps(fps: Any) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
            or not math.isfinite(fps) or fps <= 0:
        raise ProcessingError(f"fps={fps!r}: need a number of frames per second > 0 (Qwen2.5-VL: 2.0)")
    return float(fps)


def read_video(src: Any, *, fps: float = DEFAULT_FPS, min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES,
               source_fps: float | None = None, max_bytes: int | None = None) -> Video:
    """A video file, a folder of frames or an array [T, H, W, 3] -> its sampled frames.
    `max_bytes`: the most the sampled frames may take (default `default_max_bytes()`)."""
    fps = check_fps(fps)
    t0 = time.perf_counter()
    if isinstance(src, Video):
        return src
    limits = dict(fps=fps, min_frames=min_frames, max_frames=max_frames)
    budget = default_max_bytes() if max_bytes is None else int(max_bytes)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if path.is_dir():
            return dataclasses.replace(_read_folder(path, float(source_fps or fps), limits, budget),
                                       read_s=time.perf_counter() - t0)
        if not path.exists():
            raise ProcessingError(f"video file not found: {str(path)!r}")
        try:
            video = _read_file(path, limits, budget)
        except OSError as e:  # the file itself (permissions, I/O): FFmpeg's own errors are handled inside
            raise ProcessingError(f"cannot read video file {str(path)!r} ({e.strerror or type(e).__name__})") from None
        return dataclasses.replace(video, read_s=time.perf_counter() - t0)
    frames = _from_array(src)
    rate = float(source_fps or fps)
    idx = sample_indices(len(frames), rate, label="array", **limits)
    return Video(np.ascontiguousarray(frames[idx]), idx / rate, idx, len(frames), rate, "array",
                 time.perf_counter() - t0)


def default_max_bytes() -> int:
    """Half of this machine's physical memory (8 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return 8 << 30


def _check_size(label: str, n: int, height: int, width: int, fps: float, budget: int) -> None:
    """Refuse to hold n sampled frames of height x width RGB when they exceed `budget` bytes."""
    need = n * height * width * 3
    if need > budget:
        raise ProcessingError(
            f"{label}: {n} sampled frames of {width}x{height} need {_bytes(need)} of memory, more than the "
            f"{_bytes(budget)} allowed; sample fewer frames (--fps below {fps:g}), cut the video shorter or "
            "scale it down (e.g. ffmpeg -vf scale=-2:720)")


def _bytes(n: int) -> str:
    """n bytes in the largest binary unit that keeps it >= 1 (KiB .. GiB), one decimal."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


# ---------------------------------------------------------------------- files (PyAV)
def _open(path: Path):
    import av  # only here: reading a video file needs PyAV

    try:
        container = av.open(str(path))
    except av.error.EOFError:
        raise ProcessingError(_mp4_problem(path) or f"{str(path)!r} ends before its first video frame: "
                              "it holds no frames, or is truncated") from None
    except av.error.FFmpegError as e:
        raise ProcessingError(_mp4_problem(path) or f"{str(path)!r} is not a video file FFmpeg can read "
                              f"({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise ProcessingError(_mp4_problem(path) or f"{str(path)!r} has no video stream: not a video file, "
                              "or one without frames")
    return container


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e).split(":")[0] or type(e).__name__


def _mp4_problem(path: Path) -> str | None:
    """What is wrong with an MP4/MOV file FFmpeg could not use, from its top-level boxes (FFmpeg
    says only "no stream"): a box running past the end of the file (truncated), no `moov` index
    (truncated before the index, which most writers put last), or an index without samples (no
    frames). None for other files."""
    size = path.stat().st_size
    boxes, at = [], 0
    with open(path, "rb") as f:
        if f.read(8)[4:8] != b"ftyp":
            return None
        while at + 8 <= size:
            f.seek(at)
            head = f.read(16)
            length, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if length == 1 and len(head) == 16:
                length = int.from_bytes(head[8:16], "big")
            elif length == 0:
                length = size - at
            if length < 8:
                break
            boxes.append(kind)
            if at + length > size:
                return (f"{str(path)!r} is truncated: its {kind.decode('latin-1')!r} box needs {at + length} bytes "
                        f"but the file has {size}")
            at += length
    if b"moov" not in boxes:
        return f"{str(path)!r} is truncated or unfinished: it has no 'moov' index (the writer did not finish it)"
    return f"{str(path)!r} holds no video frames"


_EBML, _SEGMENT = 0x1A45DFA3, 0x18538067  # Matroska/WebM: the EBML header's and the Segment's element IDs
_EBML_GLOBAL = (0xEC, 0xBF)  # Void and CRC-32: allowed at the top level, before the Segment


def _matroska_problem(path: Path) -> str | None:
    """A Matroska/WebM file (mkv, webm) whose Segment runs past the end of the file, by the size
    its header declares: truncated. FFmpeg reads such a file up to where it stops, as a shorter
    video, and these files announce no frame count to compare with. None for other files and for
    a Segment of unknown size (live recordings write one: such a file, cut, still reads as a shorter
    video)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4096)

    def vint(at: int, keep_marker: bool) -> tuple[int, int, bool]:
        """(value, next offset, all value bits set) of the EBML variable-length integer at `at`."""
        if at >= len(head) or head[at] == 0:
            raise ValueError
        n = 9 - head[at].bit_length()  # 1..8 bytes: the position of the first set bit
        if at + n > len(head):
            raise ValueError
        raw = int.from_bytes(head[at:at + n], "big")
        value = raw if keep_marker else raw & ((1 << (7 * n)) - 1)
        return value, at + n, value == (1 << (7 * n)) - 1

    try:
        ident, at, _ = vint(0, True)
        if ident != _EBML:
            return None
        length, at, _ = vint(at, False)
        ident, at, _ = vint(at + length, True)
        while ident in _EBML_GLOBAL:
            length, at, _ = vint(at, False)
            ident, at, _ = vint(at + length, True)
        length, at, unknown = vint(at, False)
    except ValueError:
        return None
    if ident != _SEGMENT or unknown or at + length <= size:
        return None
    return (f"{str(path)!r} is truncated: its Matroska segment needs {at + length} bytes but the file has {size} "
            f"(download it again, or keep what is there with `ffmpeg -i IN -c copy OUT`)")


def _count_frames(path: Path) -> int:
    """Frames in the file: the stream header's count, else its video packets (demuxed, not decoded)."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        try:
            return sum(1 for p in container.demux(stream) if p.size)
        except av.error.FFmpegError as e:
            raise ProcessingError(f"{str(path)!r} is damaged or truncated ({_reason(e)})") from None


def _read_file(path: Path, limits: dict, budget: int) -> Video:
    import av

    problem = _matroska_problem(path)
    if problem:
        raise ProcessingError(problem)
    total = _count_frames(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or total == 0:
            raise ProcessingError(f"{str(path)!r} holds no video frames" if total == 0 else
                                  f"{str(path)!r} has no frame rate; extract its frames to a folder instead")
        rate = float(rate)
        label = repr(str(path))
        idx = sample_indices(total, rate, label=label, **limits)
        header = (stream.codec_context.height, stream.codec_context.width)
        _check_size(label, len(idx), *header, limits["fps"], budget)  # before anything is decoded
        wanted, frames, times, seen = set(idx.tolist()), None, [], 0
        try:
            for seen, frame in enumerate(container.decode(stream)):
                if seen in wanted:
                    size = (frame.height, frame.width)
                    if frames is None:
                        if size != header:  # the stream's header was wrong
                            _check_size(label, len(idx), *size, limits["fps"], budget)
                        frames = np.empty((len(idx), *size, 3), np.uint8)
                    elif size != frames.shape[1:3]:
                        raise ProcessingError(f"{label} changes its frame size mid-stream; re-encode it at one size")
                    frames[len(times)] = frame.to_ndarray(format="rgb24")
                    times.append(float(frame.time) if frame.time is not None else seen / rate)
                if seen >= idx[-1]:
                    break
        except av.error.FFmpegError as e:
            raise ProcessingError(f"{str(path)!r} is damaged or truncated ({_reason(e)})") from None
    if len(times) < len(idx):
        raise ProcessingError(f"{str(path)!r} is truncated or damaged: it announces {total} frames but only "
                              f"{seen + 1 if times else 0} could be decoded")
    return Video(frames, np.asarray(times, np.float64), idx, total, rate, str(path))


# ---------------------------------------------------------------------- folders and arrays
def _read_folder(path: Path, rate: float, limits: dict, budget: int) -> Video:
    """The sampled frames of a folder of images in name order (only those are read)."""
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise ProcessingError(f"folder {str(path)!r} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
    label = f"folder {str(path)!r}"
    idx = sample_indices(len(files), rate, label=label, **limits)
    first = np.asarray(load_image(files[idx[0]]))
    _check_size(label, len(idx), first.shape[0], first.shape[1], limits["fps"], budget)
    frames = np.empty((len(idx), *first.shape), np.uint8)
    for k, i in enumerate(idx):
        frame = first if k == 0 else np.asarray(load_image(files[i]))
        if frame.shape != first.shape:
            raise ProcessingError(f"{label}: frames of different sizes ({first.shape[1]}x{first.shape[0]}, "
                                  f"{frame.shape[1]}x{frame.shape[0]} in {files[i].name}); give frames of one size")
        frames[k] = frame
    return Video(frames, idx / rate, idx, len(files), rate, str(path))


def _from_array(src: Any) -> np.ndarray:
    if isinstance(src, (list, tuple)):
        return _stack([np.asarray(load_image(f)) for f in src], "frame list")
    a = np.asarray(src)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ProcessingError(f"a video array must be [T, H, W, 3] (frames, channels last), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    return _stack([np.asarray(load_image(f)) for f in a], "video array")


def _stack(frames: list[np.ndarray], label: str) -> np.ndarray:
    if len({f.shape for f in frames}) != 1:
        sizes = sorted({f"{f.shape[1]}x{f.shape[0]}" for f in frames})
        raise ProcessingError(f"{label}: frames of different sizes ({', '.join(sizes)}); give frames of one size")
    return np.stack(frames)
