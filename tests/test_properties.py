"""Property-based tests (hypothesis): the COCO and results readers accept valid files and refuse anything
else with a RefineError (never another exception); refined boxes are always valid boxes.

Conversions, IoU bounds and clipping are covered in tests/test_train.py."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.inference.core import refine_boxes
from pipeline.boxes import valid_boxes
from pipeline.coco import BORDER_SLACK, load_coco, load_detections
from pipeline.errors import RefineError
from pipeline.model.base import RefinerConfig
from pipeline.model.registry import build_refiner
from pipeline.store import FeatureStore, Namespace

# JSON values of every type, and numbers that break naive code (NaN, inf, huge, negative, bool).
numbers = st.one_of(
    st.integers(-10, 300), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.just(1e308)
)
junk = st.one_of(st.none(), st.text(max_size=5), numbers, st.lists(st.integers(), max_size=5), st.just({}))
maybe = lambda strategy: st.one_of(strategy, junk)  # noqa: E731  mostly valid, sometimes anything


@st.composite
def coco_files(draw: st.DrawFn) -> Any:
    images = [
        {
            "id": draw(maybe(st.integers(1, 6))),
            "file_name": draw(maybe(st.sampled_from(["a.png", "b/c.jpg", "../x.png", "/abs.png", "", "d.png"]))),
            "width": draw(maybe(st.integers(0, 300))),
            "height": draw(maybe(st.integers(0, 300))),
        }
        for _ in range(draw(st.integers(0, 4)))
    ]
    annotations = [
        {
            "id": draw(maybe(st.integers(1, 8))),
            "image_id": draw(maybe(st.integers(1, 6))),
            "category_id": draw(maybe(st.integers(1, 3))),
            "bbox": draw(maybe(st.lists(numbers, min_size=3, max_size=5))),
        }
        for _ in range(draw(st.integers(0, 5)))
    ]
    return draw(st.one_of(st.just({"images": images, "annotations": annotations}), junk, st.just(images)))


def _write(value: Any) -> Path:
    handle = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    with handle:
        json.dump(value, handle)  # NaN and inf are written as NaN / Infinity, as some tools do
    return Path(handle.name)


@settings(max_examples=80, deadline=None)
@given(coco_files())
def test_coco_reader_accepts_valid_files_and_refuses_the_rest_cleanly(value: Any) -> None:
    path = _write(value)
    try:
        coco = load_coco(path)
    except RefineError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)  # one line naming the file
        return
    finally:
        path.unlink()
    ids = [image.id for image in coco.images]
    assert len(ids) == len(set(ids))
    sizes = {image.id: (image.width, image.height) for image in coco.images}
    for annotation in coco.annotations:
        x, y, w, h = annotation.bbox
        width, height = sizes[annotation.image_id]
        assert all(math.isfinite(v) for v in annotation.bbox) and w > 0 and h > 0
        assert x >= -BORDER_SLACK and y >= -BORDER_SLACK
        assert x + w <= width + BORDER_SLACK and y + h <= height + BORDER_SLACK
    for image in coco.images:
        assert ".." not in image.file_name.split("/") and not image.file_name.startswith("/")


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(
        st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {"image_id": maybe(st.integers(1, 3)), "bbox": maybe(st.lists(numbers, min_size=4, max_size=4))}
                ),
                junk,
            ),
            max_size=6,
        ),
        junk,
    )
)
def test_results_reader_accepts_valid_detections_and_refuses_the_rest_cleanly(value: Any) -> None:
    coco_path = _write({"images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 80} for i in (1, 2, 3)]})
    results = _write(value)
    try:
        boxes, _ = load_detections(results, load_coco(coco_path))
    except RefineError as error:
        assert str(error).startswith(str(results)) and "\n" not in str(error)
        return
    finally:
        coco_path.unlink()
        results.unlink()
    for image_boxes in boxes.values():
        for x, y, w, h in image_boxes:
            # Coarse boxes are clipped to the image, not refused, when they cross its border.
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 100 and y + h <= 80


coordinates = st.floats(-5000, 5000) | st.sampled_from([math.nan, math.inf, -math.inf])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(coordinates, coordinates, coordinates, coordinates), min_size=1, max_size=6),
    st.tuples(st.integers(1, 3000), st.integers(1, 3000)),
    st.data(),
)
def test_refined_boxes_are_always_valid_boxes_inside_the_image(
    raw: list, image_hw: tuple[int, int], data: st.DataObject
) -> None:
    height, width = image_hw
    fallback = []
    for _ in raw:  # coarse boxes as the readers let them through: inside the image up to the border slack
        x0 = data.draw(st.floats(-BORDER_SLACK, width - 0.01))
        y0 = data.draw(st.floats(-BORDER_SLACK, height - 0.01))
        fallback.append(
            [
                x0,
                y0,
                data.draw(st.floats(x0 + 0.01, width + BORDER_SLACK)),
                data.draw(st.floats(y0 + 0.01, height + BORDER_SLACK)),
            ]
        )
    boxes = valid_boxes(torch.tensor(raw, dtype=torch.float32), torch.tensor(fallback), image_hw)
    assert torch.isfinite(boxes).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2**31), st.floats(0.0, 30.0), st.data())
def test_a_refiner_with_any_weights_returns_valid_boxes(
    base_dataset: dict, seed: int, spread: float, data: st.DataObject
) -> None:
    """However wrong its weights, what `apply` writes is a valid box inside the image."""
    store = FeatureStore(base_dataset["store"])
    namespace = Namespace.open(store, store.fingerprints()[0])
    entry = data.draw(st.sampled_from(sorted(namespace.entries().values(), key=lambda e: e.key)))
    height, width = entry.original_size
    torch.manual_seed(seed)
    model = build_refiner("similarity_cascade", RefinerConfig(early_channels=160, width=8, pool=12))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * spread)  # far from the identity it starts as
    x0 = data.draw(st.floats(0, width - 1))
    y0 = data.draw(st.floats(0, height - 1))
    coarse = torch.tensor([[x0, y0, data.draw(st.floats(x0 + 0.5, width)), data.draw(st.floats(y0 + 0.5, height))]])
    refined, score = refine_boxes(model, namespace, entry, coarse, torch.device("cpu"))
    assert torch.isfinite(refined).all() and (refined[:, 2:] > refined[:, :2]).all()
    assert torch.isfinite(score).all() and ((score >= 0) & (score <= 1)).all()
    assert (refined[:, :2] >= 0).all() and (refined[:, 2] <= width).all() and (refined[:, 3] <= height).all()
