"""Video on Qwen2.5-VL: logits, positions and greedy generation vs transformers for video inputs
(alone, mixed with an image, a batch of two videos of different lengths), the video processor
against transformers' image processor, pruning across frames vs the float64 PyTorch reference,
frame reading and sampling, and the CLI end to end on an mp4 (tiny random Qwen2.5-VL built in the
test, tests/hf_tiny.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import torch  # noqa: E402  (test dependency: the parity reference)
import transformers  # noqa: E402

from hf_tiny import (QWEN_EOS, QWEN_IMAGE, QWEN_PAD, QWEN_VEND, QWEN_VIDEO, QWEN_VSTART,  # noqa: E402
                     build_tiny_qwen2_5_vl)
from torch_reference import qwen_pruned_forward  # noqa: E402

import ep_jax  # noqa: E402
from ep_jax import checkpoint  # noqa: E402
from ep_jax.core.budget import PruneConfig  # noqa: E402
from ep_jax.errors import ProcessingError  # noqa: E402
from ep_jax.image_files import load_image  # noqa: E402
from ep_jax.video import read_video, sample_indices  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIM = 3 * 2 * 14 * 14
VIDEO_GRIDS = [(3, 6, 8), (2, 4, 4)]  # (t, h, w) patches: 36 and 8 merged tokens
SECONDS = [2 / 3, 1.5]  # second_per_grid_ts: temporal position steps of 1.33 and 3 (tokens_per_second 2)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d, tm = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_video"))
    return d, tm, checkpoint.load(d)


def _pixels(grids, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(int(sum(np.prod(g) for g in grids)), DIM)).astype(np.float32)


def _block(token, n):
    return [QWEN_VSTART] + [token] * n + [QWEN_VEND]


def _batch(rows):
    """Left-padded ids and mask, and mm_token_type_ids."""
    length = max(map(len, rows))
    ids, mask = np.zeros((len(rows), length), np.int64), np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    types = np.where(ids == QWEN_IMAGE, 1, np.where(ids == QWEN_VIDEO, 2, 0)).astype(np.int64)
    return ids, mask, types


def _tokens(grid):
    return int(np.prod(grid)) // 4


def _torch(**arrays):
    return {k: torch.tensor(np.asarray(v)) for k, v in arrays.items() if v is not None}


def _case(kind):
    """input_ids, attention_mask, mm_token_type_ids and the visual arrays of one test case."""
    if kind == "video":  # one video, one row
        grids, pv = VIDEO_GRIDS[:1], _pixels(VIDEO_GRIDS[:1], 0)
        rows = [[20, 21] + _block(QWEN_VIDEO, _tokens(grids[0])) + [22, 23, 24]]
        return rows, dict(pixel_values_videos=pv, video_grid_thw=np.array(grids), second_per_grid_ts=SECONDS[:1])
    if kind == "mixed":  # an image, then a video, in one prompt
        img, grids = [(1, 4, 6)], VIDEO_GRIDS[:1]
        rows = [[20] + _block(QWEN_IMAGE, _tokens(img[0])) + [21] + _block(QWEN_VIDEO, _tokens(grids[0])) + [22, 23]]
        return rows, dict(pixel_values=_pixels(img, 1), image_grid_thw=np.array(img), pixel_values_videos=_pixels(
            grids, 2), video_grid_thw=np.array(grids), second_per_grid_ts=SECONDS[:1])
    if kind == "image":
        img = [(1, 16, 24)]
        rows = [[20] + _block(QWEN_IMAGE, _tokens(img[0])) + [21, 22]]
        return rows, dict(pixel_values=_pixels(img, 4), image_grid_thw=np.array(img))
    # two videos of different lengths (frames x grid), one per row
    rows = [[20, 21] + _block(QWEN_VIDEO, _tokens(g)) + [22, 23 + i] for i, g in enumerate(VIDEO_GRIDS)]
    return rows, dict(pixel_values_videos=_pixels(VIDEO_GRIDS, 3), video_grid_thw=np.array(VIDEO_GRIDS),
                      second_per_grid_ts=SECONDS)


@pytest.mark.parametrize("kind", ["video", "mixed", "two_videos"])
def test_logits_and_positions_match_transformers(kind, qwen):
    _, tm, model = qwen
    rows, vis = _case(kind)
    ids, mask, types = _batch(rows)
    with torch.no_grad():
        t = _torch(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, **vis)
        ref = tm(**t).logits.numpy()
        want, _ = tm.model.get_rope_index(t["input_ids"], t["mm_token_type_ids"], t.get("image_grid_thw"),
                                          t["video_grid_thw"], t["second_per_grid_ts"],
                                          attention_mask=t["attention_mask"])
    pixels = vis.pop("pixel_values", None)
    inputs, spans = model.family.inputs(model.config, ids, pixels, mask, mm_token_type_ids=types, **vis)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(inputs["mrope_positions"][:, valid], want.numpy()[:, valid])
    got = ep_jax.forward(model, ids, pixels, mask, mm_token_type_ids=types, **vis).logits
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(spans.counts(), (types > 0).sum(1))


@pytest.mark.parametrize("kind,full,rotate_in_groups", [
    ("two_videos", "bands", True), ("mixed", "bands", True), ("image", "bands", True),
    ("two_videos", "segments", True), ("mixed", "segments", True), ("mixed", "segments", False)])
def test_vision_attention_layouts_match_transformers(kind, full, rotate_in_groups, qwen, monkeypatch):
    """Small query blocks and key buckets. Full attention by bands: each block of queries reads
    only the frame pairs it touches (batches with a video), W < P rows; or, for a batch with a
    video, by dense segments (each frame pair, or the image, against itself). Window attention
    runs as a batch of equal windows. On CPU, windows and segments go in small groups and the
    blocks' MLPs in chunks of rows; each group rotates its own q and k rows (or, undone, every
    row is rotated first). The logits still equal transformers'."""
    from ep_jax.families.qwen2_5_vl import vision

    monkeypatch.setattr(vision, "ROTATE_IN_GROUPS", rotate_in_groups)
    monkeypatch.setattr(vision, "QUERY_BLOCK", 96)  # not a divisor of P: the last block of queries is short
    monkeypatch.setattr(vision, "KEY_BUCKET", 64)
    monkeypatch.setattr(vision, "ROW_CHUNK", 96)  # the blocks' MLPs in chunks of rows, the last one short
    monkeypatch.setattr(vision, "CPU_GROUP_SCORES", 1024)  # attention in groups: 4 windows, 1 segment a group
    if full == "bands":
        monkeypatch.setattr(vision, "SEGMENT_SCORES", 0)
    _, tm, model = qwen
    rows, vis = _case(kind)
    ids, mask, types = _batch(rows)
    pixels = vis.pop("pixel_values", None)
    inputs, _ = model.family.inputs(model.config, ids, pixels, mask, **vis)
    # patches before the padding (which reads slot 0)
    real = sum(int(np.prod(vis[k], 1).sum()) for k in ("video_grid_thw", "image_grid_thw") if k in vis)
    padded = len(inputs["pixel_values"])  # a multiple of 256 with a video in the batch, of 1,024 without
    assert padded == (1024 if kind == "image" else 256) and real <= padded
    windows = inputs["vision_window_rows"]  # dense windows of at most 16 patches (the tiny tower's)
    assert windows.shape[1] == 16 and windows.shape[0] >= padded // 16
    np.testing.assert_array_equal(windows.reshape(-1)[inputs["vision_window_slot"]][:real], np.arange(real))
    if full == "bands":
        keys = inputs["vision_full_keys"]  # a video's frame pairs: bands narrower than P, read as slices
        assert keys.shape[0] == -(-padded // 96) and (keys.shape[1] == padded if kind == "image" else
                                                      keys.shape[1] < padded), keys.shape
        assert inputs["vision_full_rows"].size == 0
    else:
        segments = inputs["vision_full_rows"]
        frame_pairs = int(vis["video_grid_thw"][:, 0].sum()) + (pixels is not None)
        assert len(segments) == -(-frame_pairs // 4) * 4 and inputs["vision_full_keys"].size == 0
        np.testing.assert_array_equal(segments.reshape(-1)[inputs["vision_full_slot"]][:real], np.arange(real))
    with torch.no_grad():
        ref = tm(**_torch(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, pixel_values=pixels,
                          **vis)).logits.numpy()
    got = ep_jax.forward(model, ids, pixels, mask, **vis).logits
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)


def test_vision_settings_are_part_of_the_compile_key(qwen, monkeypatch):
    """A setting the tower's graph reads when traced (ROTATE_IN_GROUPS, ROW_CHUNK, ...) but the
    inputs do not show: changed, the same inputs compile anew, never reuse the other program."""
    from ep_jax.families.qwen2_5_vl import vision
    from ep_jax.runtime.engine import compile_stats

    _, _, model = qwen
    rows, vis = _case("mixed")
    ids, mask, _ = _batch(rows)
    pixels = vis.pop("pixel_values", None)
    first = ep_jax.forward(model, ids, pixels, mask, **vis).logits
    before = compile_stats(model)["compiles"]
    ep_jax.forward(model, ids, pixels, mask, **vis)
    assert compile_stats(model)["compiles"] == before  # same settings: the cached program
    monkeypatch.setattr(vision, "ROTATE_IN_GROUPS", not vision.ROTATE_IN_GROUPS)
    again = ep_jax.forward(model, ids, pixels, mask, **vis).logits
    assert compile_stats(model)["compiles"] == before + 1
    np.testing.assert_allclose(again, first, atol=1e-5, rtol=0)


def test_full_attention_layout_choice():
    """Which way the full-attention layers run, at Qwen2.5-VL-7B's real sizes (host side only):
    a video by dense frame-pair segments (exact: each row in its own pair's segment, padding in
    none); images by bands of every row (static per patch bucket); a video beside an image too
    large for one segment by bands; every layout covers each real row exactly once."""
    from ep_jax.families.qwen2_5_vl.config import QwenVisionConfig
    from ep_jax.families.qwen2_5_vl.vision import layout, patch_bucket

    cfg = QwenVisionConfig()
    assert patch_bucket(11520, video=True) == 11520 and patch_bucket(11520) == 12288  # 32 frames of 20 x 36
    cases = {"video": [(16, 20, 36)], "images": [(1, 64, 80), (1, 20, 36)],
             "video_and_big_image": [(1, 64, 80), (8, 20, 36)]}
    for name, grids in cases.items():
        real = int(sum(np.prod(g) for g in grids))
        lay = layout(np.array(grids), cfg, patch_bucket(real))
        p = len(lay.perm)
        windows = lay.window_rows.reshape(-1)
        np.testing.assert_array_equal(np.sort(windows[windows >= 0]), np.arange(real))
        if name == "video":
            assert lay.full_rows.shape == (16, 736) and lay.full_keys.size == 0
            rows = lay.full_rows
            np.testing.assert_array_equal(np.sort(rows[rows >= 0]), np.arange(real))
            for seg in rows:  # one frame pair per segment, 720 patches each
                seg = seg[seg >= 0]
                assert len(seg) == 720 and len(set(lay.full_segment[seg].tolist())) == 1
            np.testing.assert_array_equal(rows.reshape(-1)[lay.full_slot[:real]], np.arange(real))
        elif name == "images":
            assert lay.full_rows.size == 0 and lay.full_keys.shape[1] == p
        else:  # the 5,120-patch image is too large for one segment: bands, narrower than P
            assert lay.full_rows.size == 0 and 0 < lay.full_keys.shape[1] < p


def _frames(n, h, w, seed=0, pairs=False):
    """uint8 [n, h, w, 3] frames: a photo with a square moving across it (in identical pairs)."""
    from conftest import photo

    base = np.asarray(PIL.Image.fromarray(photo("astronaut")).resize((w, h)))
    out = []
    for i in range(n):
        f = base.copy()
        k = i // 2 if pairs else i
        x = (k * 7 + seed * 5) % max(1, w - 12)
        f[h // 3: h // 3 + 12, x: x + 12] = (255, 40 * (k % 6), 0)
        out.append(f)
    return np.stack(out)


def test_greedy_generation_matches_transformers(qwen):
    _, tm, model = qwen
    videos = [_frames(8, 56, 84), _frames(4, 84, 56, seed=1)]  # different lengths and grids
    prompts = ["What happens in the video?", "Describe it."]
    got = ep_jax.generate(model, None, prompts, max_new_tokens=16, prune=None, return_ids=True, videos=videos)[1]
    enc = model.processor.encode(prompts, None, videos=videos, bucket_sizes=None)
    assert enc["video_grid_thw"].tolist() == [[4, 4, 6], [2, 6, 4]]
    t = _torch(input_ids=enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"].astype(np.int64),
               pixel_values_videos=np.asarray(enc["pixel_values_videos"]), video_grid_thw=enc["video_grid_thw"],
               second_per_grid_ts=enc["second_per_grid_ts"], mm_token_type_ids=enc["mm_token_type_ids"])
    with torch.no_grad():
        ref = tm.generate(**t, max_new_tokens=16, do_sample=False, eos_token_id=QWEN_EOS,
                          pad_token_id=QWEN_PAD)[:, enc["input_ids"].shape[1]:].tolist()
    ref = [r[: r.index(QWEN_EOS) + 1] if QWEN_EOS in r else r for r in ref]
    assert [list(map(int, g)) for g in got] == ref
    assert sum(map(len, ref)) > 16  # not an immediate end of sequence


def test_processor_puts_an_image_and_a_video_in_one_prompt(qwen):
    """The processor's arrays for a prompt with an image and a video (the image's vision block
    first, as the chat template puts the content in order) give transformers' logits."""
    _, tm, model = qwen
    image = PIL.Image.fromarray(_frames(1, 84, 112)[0])
    enc = model.processor.encode(["What changes?"], [[image]], videos=[_frames(4, 56, 84)], bucket_sizes=None)
    ids = enc["input_ids"][0]
    first_video, last_image = np.flatnonzero(ids == QWEN_VIDEO)[0], np.flatnonzero(ids == QWEN_IMAGE)[-1]
    assert last_image < first_video and enc["image_grid_thw"].tolist() == [[1, 6, 8]]
    with torch.no_grad():
        ref = tm(**_torch(input_ids=enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"],
                          pixel_values=np.asarray(enc["pixel_values"]), image_grid_thw=enc["image_grid_thw"],
                          pixel_values_videos=np.asarray(enc["pixel_values_videos"]),
                          video_grid_thw=enc["video_grid_thw"], second_per_grid_ts=enc["second_per_grid_ts"],
                          mm_token_type_ids=enc["mm_token_type_ids"])).logits.numpy()
    enc.pop("lengths")
    got = ep_jax.forward(model, **enc).logits
    np.testing.assert_allclose(got[0], ref[0], atol=1e-4, rtol=0)


def test_video_processor_equals_the_image_processor_on_frame_pairs(qwen):
    """Frames in identical pairs, all resized to one size: each temporal patch is exactly the
    patches transformers' Qwen2VLImageProcessorPil gives for that frame (it repeats an image over
    the 2 temporal slots)."""
    from ep_jax.families.qwen2_5_vl.video_processing import QwenVideoProcessor

    _, _, model = qwen
    lo, hi = 56 * 56, 28 * 28 * 30
    frames = _frames(6, 90, 150, pairs=True)  # 150x90 resizes to 140x84 (needs resizing)
    ours = QwenVideoProcessor(min_pixels=lo, resize_max_pixels=hi).video_patches(frames, fps=2.0)
    theirs = transformers.Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi)(
        [PIL.Image.fromarray(f) for f in frames[::2]], return_tensors="np")
    np.testing.assert_array_equal(ours.pixels, theirs["pixel_values"])
    assert ours.grid == (3, *theirs["image_grid_thw"][0, 1:]) == (3, 6, 10)
    assert ours.second_per_grid_t == 1.0  # 2 frames per patch at the sampled 2 fps
    assert ours.num_tokens == 3 * 6 * 10 // 4
    assert (QwenVideoProcessor().min_pixels, QwenVideoProcessor().resize_max_pixels) == (128 * 28 * 28, 768 * 28 * 28)
    # the processor: <|video_pad|> expands to grid.prod() // 4, token types 2 there; an array's
    # frames are taken `fps` apart, so at fps 1 each temporal patch spans 2 s
    enc = model.processor.encode(["What moves?"], None, videos=[frames], fps=1.0, bucket_sizes=None)
    ids, types = enc["input_ids"][0], enc["mm_token_type_ids"][0]
    n = int(np.prod(enc["video_grid_thw"][0])) // 4
    assert (ids == QWEN_VIDEO).sum() == n and ((types == 2) == (ids == QWEN_VIDEO)).all() and n > 0
    np.testing.assert_allclose(enc["second_per_grid_ts"], [2.0])
    assert enc["video_grid_thw"][0, 0] == 3


def test_pruned_positions_and_logits_match_the_float64_reference(qwen):
    """K = 1, one top-R over an image's and a video's tokens together: the kept indices, their
    three position rows and the logits equal transformers' model pruned in float64."""
    _, tm, model = qwen
    rows, vis = _case("mixed")
    ids, mask, types = _batch(rows)
    n = int((types > 0).sum())
    keep = 10
    ref_logits, ref_kept, ref_pos = qwen_pruned_forward(tm, torch.tensor(ids), torch.tensor(types), 1, keep,
                                                        **_torch(**vis))
    pixels = vis.pop("pixel_values")
    out = ep_jax.forward(model, ids, pixels, mask, prune=PruneConfig(layer=1, keep=keep), **vis)
    inputs, _ = model.family.inputs(model.config, ids, pixels, mask, **vis)
    rows_ = out.positions[0][out.row_valid[0]]
    np.testing.assert_array_equal(rows_, ref_kept.numpy())
    np.testing.assert_array_equal(inputs["mrope_positions"][:, 0, rows_], ref_pos.numpy())
    assert len(rows_) == ids.shape[1] - n + keep
    assert (types[0, rows_] == 2).any() and (types[0, rows_] == 1).sum() < 6  # kept tokens from both
    np.testing.assert_allclose(out.logits[0][out.row_valid[0]], ref_logits[0].numpy(), atol=1e-4, rtol=0)



def test_other_methods_prune_across_frames(qwen):
    """FastV, pooling and random pruning also keep each example's own R over all its frames."""
    _, _, model = qwen
    rows, vis = _case("two_videos")
    ids, mask, types = _batch(rows)
    for method in ("fastv", "pool", "random"):
        out = ep_jax.forward(model, ids, None, mask, prune=PruneConfig(method=method, layer=2, keep_ratio=0.5), **vis)
        assert np.isfinite(out.logits[out.row_valid]).all()
        kept = [(out.kept_mask[i] & (types[i] == 2)).sum() for i in range(2)]
        np.testing.assert_array_equal(kept, out.keep)
        assert (out.keep < (types == 2).sum(1)).all()


# ---------------------------------------------------------------------- reading and sampling
def write_mp4(path, frames, fps=4, codec="mpeg4"):
    """`frames` written with PyAV into the container `path`'s suffix names (mp4, mkv, webm, ...)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.options = {"qscale": "1"}
        for f in frames:
            for packet in s.encode(__import__("av").VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def test_frame_sampling_is_transformers_rule_and_deterministic(tmp_path):
    # transformers' sample_frames with fps: total / source_fps * fps frames, clamped to
    # [min_frames, min(max_frames, total)], rounded down to even, spread uniformly
    np.testing.assert_array_equal(sample_indices(12, 4.0, fps=2.0), [0, 2, 4, 6, 8, 10])
    np.testing.assert_array_equal(sample_indices(30, 30.0, fps=2.0), [0, 7, 15, 22])  # 2 frames -> min_frames 4
    np.testing.assert_array_equal(sample_indices(9, 1.0, fps=2.0), [0, 1, 2, 3, 4, 5, 6, 7])  # at most total, even
    assert len(sample_indices(1000, 10.0, fps=2.0, max_frames=16)) == 16
    with pytest.raises(ProcessingError, match="at least 2"):
        sample_indices(1, 4.0)
    frames = _frames(12, 48, 64)
    path = write_mp4(tmp_path / "clip.mp4", frames)
    a, b = read_video(path), read_video(str(path))
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.indices, [0, 2, 4, 6, 8, 10])
    np.testing.assert_allclose(a.timestamps, a.indices / 4.0)
    assert a.frames.shape == (6, 48, 64, 3) and a.sampled_fps == 2.0 and a.total_frames == 12
    error = np.abs(a.frames[:, None].astype(int) - frames[None].astype(int)).mean((2, 3, 4))
    np.testing.assert_array_equal(error.argmin(1), a.indices)  # each decoded frame is its source frame (lossy codec)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        PIL.Image.fromarray(f).save(folder / f"{i:03d}.png")
    c, d = read_video(folder, fps=2.0, source_fps=4.0), read_video(frames, fps=2.0, source_fps=4.0)
    np.testing.assert_array_equal(c.frames, frames[::2])
    np.testing.assert_array_equal(d.frames, frames[::2])


def test_only_sampled_frames_are_read_and_too_many_bytes_is_one_clear_error(tmp_path, monkeypatch):
    import ep_jax.video as video

    frames = _frames(12, 48, 64)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        PIL.Image.fromarray(f).save(folder / f"{i:03d}.png")
    read = []
    monkeypatch.setattr(video, "load_image", lambda f: read.append(Path(f).name) or load_image(f))
    v = read_video(folder, fps=2.0, source_fps=4.0)
    np.testing.assert_array_equal(v.frames, frames[::2])
    assert read == [f"{i:03d}.png" for i in range(0, 12, 2)]  # the 6 sampled files, nothing else
    need = 6 * 48 * 64 * 3
    path = write_mp4(tmp_path / "clip.mp4", frames)
    for src, kw in ((path, {}), (folder, dict(source_fps=4.0))):
        assert read_video(src, max_bytes=need, **kw).frames.shape == (6, 48, 64, 3)
        with pytest.raises(ProcessingError, match=r"6 sampled frames of 64x48 need 54\.0 KiB of memory, more than "
                                                  r"the 54\.0 KiB allowed; sample fewer frames \(--fps below 2\)"):
            read_video(src, max_bytes=need - 1, **kw)
    assert video.default_max_bytes() > 0
    assert (video._bytes(19 << 30), video._bytes(3 << 19)) == ("19.0 GiB", "1.5 MiB")
    PIL.Image.fromarray(frames[0][:40]).save(folder / "004.png")
    with pytest.raises(ProcessingError, match=r"frames of different sizes \(64x48, 64x40 in 004.png\)"):
        read_video(folder, fps=2.0, source_fps=4.0)


def _bad_video(case, tmp_path):
    import av

    if case == "truncated":
        good = write_mp4(tmp_path / "good.mp4", _frames(12, 48, 64)).read_bytes()
        path = tmp_path / "truncated.mp4"
        path.write_bytes(good[: len(good) // 2])
    elif case == "zero_frames":
        path = tmp_path / "empty.mp4"
        with av.open(str(path), "w") as c:
            s = c.add_stream("mpeg4", rate=4)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            c.start_encoding()
    else:
        path = tmp_path / "notes.mp4"
        path.write_text("these are my notes, not a video\n")
    return path


@pytest.mark.parametrize("case,message", [("truncated", "truncated"), ("zero_frames", "no video frames"),
                                          ("not_video", "not a video file")])
def test_bad_video_files_are_one_clear_error(case, message, tmp_path):
    with pytest.raises(ProcessingError, match=message):
        read_video(_bad_video(case, tmp_path))


@pytest.mark.parametrize("suffix,codec", [("mkv", "mpeg4"), ("webm", "libvpx")])
def test_a_truncated_mkv_or_webm_is_an_error_not_a_shorter_video(suffix, codec, tmp_path):
    """mkv and webm announce no frame count, so FFmpeg reads a cut file as a shorter video; the
    size their segment declares runs past the end of the file instead."""
    path = write_mp4(tmp_path / f"clip.{suffix}", _frames(12, 48, 64), codec=codec)
    assert read_video(path, fps=4.0).num_frames == 12
    data = path.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    for keep in (len(data) - 16, len(data) // 2, 300):
        cut.write_bytes(data[:keep])
        with pytest.raises(ProcessingError, match=rf"cut\.{suffix}' is truncated: its Matroska segment needs "
                                                  rf"{len(data)} bytes but the file has {keep} \(download it again"):
            read_video(cut)
    # the segment's size field: after the EBML header (ID, size, body) and the segment's 4-byte ID
    width = lambda b: 9 - b.bit_length()  # noqa: E731 - an EBML variable-length integer's bytes
    n = width(data[4])
    header_end = 4 + n + (int.from_bytes(data[4:4 + n], "big") & ((1 << 7 * n) - 1))
    at = header_end + 4
    n = width(data[at])
    unknown = data[:at] + ((1 << 7 * n + 1) - 1).to_bytes(n, "big") + data[at + n:]  # a live recording's
    void = data[:header_end] + bytes([0xEC, 0x82, 0, 0]) + data[header_end:]  # a Void element first
    for name, whole in (("appended", data + bytes(100)), ("unknown", unknown), ("void", void)):
        (tmp_path / f"{name}.{suffix}").write_bytes(whole)
        assert read_video(tmp_path / f"{name}.{suffix}", fps=4.0).num_frames == 12, name
    cut.write_bytes(void[:len(void) // 2])
    with pytest.raises(ProcessingError, match=rf"segment needs {len(void)} bytes but the file has {len(void) // 2}"):
        read_video(cut)


def test_an_unreadable_video_file_is_one_clear_error(tmp_path, monkeypatch):
    import ep_jax.video as video

    path = write_mp4(tmp_path / "clip.mp4", _frames(4, 48, 64))

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(video, "_read_file", denied)
    with pytest.raises(ProcessingError, match=r"cannot read video file '.*clip\.mp4' \(Permission denied\)"):
        read_video(path)


# ---------------------------------------------------------------------- CLI
def cli(*args):
    return subprocess.run([sys.executable, "-m", "ep_jax.generate", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_cli_answers_about_an_mp4_with_pruning_report_and_explain(qwen, tmp_path):
    d, _, model = qwen
    path = write_mp4(tmp_path / "clip.mp4", _frames(16, 56, 84))
    args = ("--model", d, "--video", path, "--prompt", "What moves?", "--max-new-tokens", "6")
    r = cli(*args, "--prune", "entropy", "--prune-layer", "1", "--keep-ratio", "0.25", "--json",
            "--explain", tmp_path / "strip.png")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    pairs = out["prune"]["video_kept_per_frame_pair"][0][0]
    assert len(pairs["kept"]) == 4 and pairs["tokens"] == 6  # 8 frames sampled at 2 fps: 4 pairs of 4x6 patches
    assert sum(pairs["kept"]) == out["prune"]["keep"] < 24
    assert out["timings"]["video_read_ms"] > 0
    cfg = PruneConfig(layer=1, keep_ratio=0.25)
    api = ep_jax.generate(model, None, ["What moves?"], max_new_tokens=6, prune=cfg, videos=[path], return_ids=True)
    assert out["token_ids"] == api[1]
    strip = np.asarray(PIL.Image.open(tmp_path / "strip.png").convert("RGB")).reshape(-1, 3).astype(int)
    assert ((strip[:, 0] > 200) & (strip[:, 1] > 200) & (strip[:, 2] < 80)).sum() > 50  # kept outlines drawn
    plain = cli(*args, "--prune", "entropy", "--prune-layer", "1", "--keep-ratio", "0.25")
    assert plain.returncode == 0 and "video 0: kept per frame pair" in plain.stderr, plain.stderr


@pytest.mark.parametrize("case", ["truncated", "zero_frames", "not_video"])
def test_cli_bad_video_is_one_clear_line(case, qwen, tmp_path):
    d, _, _ = qwen
    r = cli("--model", d, "--video", _bad_video(case, tmp_path), "--prompt", "hi")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
