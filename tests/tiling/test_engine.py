from __future__ import annotations

import os
import threading

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tiling
from tests.conftest import make_model
from tiling import TilingError
from unet import GeometryError, geometry

MARGIN = geometry.context_margin(4)


def identity(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The oracle valid network: centre-crops its input by the context margin."""
    return x[:, :, MARGIN:-MARGIN, MARGIN:-MARGIN]


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 1300),
    w=st.integers(1, 1300),
    channels=st.integers(1, 3),
    tile=st.sampled_from([388, 644, 4, 100]),
    batch=st.integers(1, 5),
    paper_stride=st.booleans(),
    dtype=st.sampled_from([np.uint8, np.uint16, np.int16, np.float32]),
)
def test_identity_model_reproduces_the_input_exactly(
    h: int, w: int, channels: int, tile: int, batch: int, paper_stride: bool, dtype: type
) -> None:
    rng = np.random.default_rng(h * 7919 + w)
    img = rng.integers(0, 255, size=(channels, h, w)).astype(dtype)
    out = tiling.segment(
        img,
        identity,
        output="probabilities",
        depth=4,
        tile_size=tile,
        batch_size=batch,
        stride=tile if paper_stride else None,
        normalize=None,
    )
    assert out.shape == (channels, h, w) and out.dtype == np.float32
    np.testing.assert_array_equal(out, img.astype(np.float32))


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (1, 700), (388, 388), (389, 777)])
def test_identity_edge_shapes(shape: tuple[int, int]) -> None:
    img = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    out = tiling.segment(img, identity, output="probabilities", depth=4, normalize=None)
    np.testing.assert_array_equal(out[0], img)


def test_identity_labels_is_argmax() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((3, 50, 60)).astype(np.float32)
    np.testing.assert_array_equal(tiling.segment(img, identity, depth=4, normalize=None), img.argmax(0))


def _whole_pass(model: torch.nn.Module, img: npt.NDArray[np.float32], plan: tiling.TilePlan) -> npt.NDArray[np.float32]:
    h, w = plan.image_shape
    ph, pw = plan.padded_shape
    padded = tiling.mirror_pad(img, MARGIN, (ph - MARGIN - h, pw - MARGIN - w))
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.ascontiguousarray(padded[None])))
    return torch.softmax(logits, 1)[0, :, :h, :w].numpy()


@pytest.mark.parametrize("shape", [(900, 700), (401, 1203), (37, 45)])
def test_real_unet_tiled_equals_one_whole_image_pass(shape: tuple[int, int]) -> None:
    model = make_model(base_width=4)
    img = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    plan = tiling.plan_tiles(shape)
    reference = _whole_pass(model, img, plan)
    probs = tiling.segment(img, model, output="probabilities", batch_size=3, normalize=None)
    labels = tiling.segment(img, model, batch_size=2, normalize=None)
    assert probs.shape == (2, *shape) and labels.shape == shape and labels.dtype == np.uint8
    np.testing.assert_allclose(probs, reference, atol=1e-5)
    np.testing.assert_array_equal(labels, reference.argmax(0))


def test_tile_size_does_not_change_the_result() -> None:
    model = make_model(base_width=4, num_classes=3)
    img = np.random.default_rng(2).normal(size=(900, 900)).astype(np.float32)
    small = tiling.segment(img, model, tile_size=388, normalize=None)
    for tile in (644, 900):
        np.testing.assert_array_equal(tiling.segment(img, model, tile_size=tile, normalize=None), small)


def test_paper_stride_shows_seams() -> None:
    """Off-grid origins (stride 388) break exact equivalence along the tile borders."""
    model = make_model(base_width=4, seed=3)
    img = np.random.default_rng(3).normal(size=(1, 776, 776)).astype(np.float32)
    seam_free = tiling.segment(img, model, output="probabilities", normalize=None)
    paper = tiling.segment(img, model, output="probabilities", stride=388, normalize=None)
    np.testing.assert_array_equal(paper[:, :388, :388], seam_free[:, :388, :388])  # first tile is on the grid
    # seam-free tiling matches the whole pass exactly; the paper layout misses it by far more
    # than float32 rounding of a ~0.5 probability (6e-8)
    assert np.abs(paper[:, 388:, 388:] - seam_free[:, 388:, 388:]).max() > 1e-6


def test_progress_reports_every_batch() -> None:
    seen: list[tuple[int, int]] = []
    tiling.segment(
        np.zeros((800, 800), np.float32),
        identity,
        depth=4,
        batch_size=4,
        progress=lambda d, t: seen.append((d, t)),
        normalize=None,
    )
    done = [d for d, _ in seen]
    assert done == sorted(set(done)) and done[-1] == 9 and {t for _, t in seen} == {9}


def test_progress_exception_aborts_the_run() -> None:
    class StopError(Exception):
        pass

    def stop(done: int, total: int) -> None:
        raise StopError

    with pytest.raises(StopError):
        tiling.segment(np.zeros((800, 800), np.float32), identity, depth=4, batch_size=1, progress=stop, normalize=None)


def test_model_with_wrong_output_shape_refused() -> None:
    with pytest.raises(TilingError, match=r"model returned shape \(1, 1, 572, 572\).*expected \(1, K, 388, 388\)"):
        tiling.segment(
            np.zeros((500, 500), np.float32), lambda x: x, depth=4, output="probabilities", batch_size=1, normalize=None
        )


def test_bad_arguments_refused() -> None:
    img = np.zeros((10, 10), np.float32)
    with pytest.raises(TilingError, match="expected a 2-D"):
        tiling.segment(np.zeros((1, 1, 10, 10)), identity, depth=4, normalize=None)
    with pytest.raises(TilingError, match="output must be"):
        tiling.segment(img, identity, depth=4, output="masks", normalize=None)  # type: ignore[arg-type]
    with pytest.raises(TilingError, match="cannot tell the network depth"):
        tiling.segment(img, identity, normalize=None)
    with pytest.raises(TilingError, match="batch size"):
        tiling.segment(img, identity, depth=4, batch_size=0, normalize=None)
    with pytest.raises(GeometryError, match="nearest valid output sizes: 388 or 404"):
        tiling.segment(img, identity, depth=4, tile_size=390, normalize=None)
    with pytest.raises(GeometryError, match="expected 3 input channel"):
        tiling.segment(img, make_model(in_channels=3, base_width=2), normalize=None)


def test_normalize_is_applied_per_tile_batch() -> None:
    img = np.full((20, 20), 10, np.uint16)
    out = tiling.segment(
        img, identity, depth=4, output="probabilities", normalize=lambda x: (x / 10).astype(np.float32)
    )
    np.testing.assert_array_equal(out, np.ones((1, 20, 20), np.float32))


# the identity network, declaring that the host has no spare core for a reader thread
_INLINE_IDENTITY = tiling.CallablePredictor(identity, depth=4, overlap_host_work=False)


@pytest.mark.parametrize("model", [identity, _INLINE_IDENTITY], ids=["threaded", "inline"])
def test_tiles_are_read_on_a_worker_thread_only_where_that_overlaps(model: object) -> None:
    readers: set[str] = set()

    def normalize(x: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
        readers.add(threading.current_thread().name)
        return x.astype(np.float32)

    img = np.random.default_rng(3).integers(0, 4000, (900, 1000), dtype=np.uint16)
    out = tiling.segment(img, model, depth=4, output="probabilities", batch_size=2, normalize=normalize)
    np.testing.assert_array_equal(out[0], img.astype(np.float32))
    inline = model is _INLINE_IDENTITY
    assert readers == ({threading.current_thread().name} if inline else {"tile-reader_0"})


def test_torch_predictor_reads_in_line_when_its_threads_take_every_core() -> None:
    predictor = tiling.TorchPredictor(make_model(base_width=2), device="cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        assert predictor.overlap_host_work is False
        if len(os.sched_getaffinity(0)) > 1:
            torch.set_num_threads(1)
            assert predictor.overlap_host_work is True  # a core is left for the reader
    finally:
        torch.set_num_threads(before)


def test_segment_refuses_to_guess_the_normalization() -> None:
    """Raw counts through a network trained on normalized inputs would be a wrong mask with no error."""
    with pytest.raises(TilingError, match=r"^pass normalize=: the checkpoint's normalization fitted on this image"):
        tiling.segment(np.zeros((50, 50), np.uint16), lambda x: x[:, :, 92:-92, 92:-92], depth=4)
    out = tiling.segment(np.ones((50, 50), np.float32), lambda x: x[:, :, 92:-92, 92:-92], depth=4, normalize=None)
    assert out.shape == (50, 50)  # None: the image is already normalized (a plain float32 cast)
