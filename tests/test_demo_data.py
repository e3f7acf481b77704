"""The synthetic demo dataset: deterministic bytes, valid COCO, exact boxes, visible objects, variety."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.coco import load_coco
from pipeline.demo_data import CATEGORIES, MAX_OBJECTS, MIN_VISIBLE_PIXELS, make_demo_dataset, render_scene
from pipeline.errors import RefineError
from stages.cli import app

N_TRAIN, N_VAL = 6, 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, seed=0, n_train=N_TRAIN, n_val=N_VAL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    padded = np.pad(mask, 1)
    return padded[1 + dy : 1 + dy + mask.shape[0], 1 + dx : 1 + dx + mask.shape[1]]


def _dilate(mask: np.ndarray) -> np.ndarray:
    return mask | _shift(mask, 1, 0) | _shift(mask, -1, 0) | _shift(mask, 0, 1) | _shift(mask, 0, -1)


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def test_same_seed_gives_byte_identical_files(demo: Path, tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, seed=0, n_train=N_TRAIN, n_val=N_VAL)
    assert _files(tmp_path) == _files(demo)


def test_another_seed_gives_other_images_and_boxes(demo: Path, tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, seed=1, n_train=N_TRAIN, n_val=N_VAL)
    ours, theirs = _files(tmp_path), _files(demo)
    assert ours.keys() == theirs.keys()
    assert all(ours[name] != theirs[name] for name in ours)


def test_changing_n_val_leaves_train_files_identical(demo: Path, tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, seed=0, n_train=N_TRAIN, n_val=1)
    ours, theirs = _files(tmp_path), _files(demo)
    train_names = [name for name in theirs if "train" in name]
    assert len(train_names) == N_TRAIN + 1
    assert all(ours[name] == theirs[name] for name in train_names)
    assert not (tmp_path / "images" / "val_0001.jpg").exists()


def test_files_are_valid_coco_with_unique_ids_across_splits(demo: Path) -> None:
    image_ids: list[int] = []
    annotation_ids: list[int] = []
    for split, count in (("train", N_TRAIN), ("val", N_VAL)):
        dataset = load_coco(demo / f"{split}.json")  # checks ids, references and boxes inside the image
        assert len(dataset.images) == count
        assert [c["name"] for c in dataset.categories] == list(CATEGORIES)
        for image in dataset.images:
            assert image.file_name.startswith(f"{split}_")
            with Image.open(demo / "images" / image.file_name) as opened:
                assert opened.format == "JPEG"
                assert opened.size == (image.width, image.height)
                assert not opened.getexif()
        image_ids += [image.id for image in dataset.images]
        annotation_ids += [a.id for a in dataset.annotations]
        assert {a.category_id for a in dataset.annotations} <= set(range(1, len(CATEGORIES) + 1))
    assert len(set(image_ids)) == len(image_ids)
    assert len(set(annotation_ids)) == len(annotation_ids)


def test_boxes_are_the_tight_boxes_of_the_visible_masks(demo: Path) -> None:
    data = json.loads((demo / "train.json").read_text())
    for index, image in enumerate(data["images"]):
        scene = render_scene(0, "train", index)
        rows = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        assert len(rows) == len(scene.objects)
        for row, obj in zip(rows, scene.objects, strict=True):
            x, y, w, h = (int(v) for v in row["bbox"])
            assert row["bbox"] == [float(v) for v in (x, y, w, h)]
            assert w >= 1 and h >= 1 and x + w <= image["width"] and y + h <= image["height"]
            assert row["area"] == int(obj.mask.sum()) >= MIN_VISIBLE_PIXELS
            assert row["area"] <= w * h
            inside = obj.mask[y : y + h, x : x + w]
            assert inside.sum() == obj.mask.sum()  # the box holds every visible pixel...
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # ...tightly
            assert row["category_id"] == obj.category_id


def test_objects_stand_out_from_their_surroundings_after_jpeg(demo: Path) -> None:
    """The box edge is unambiguous: inside and just outside each visible mask differ clearly in colour."""
    for index in range(N_TRAIN):
        scene = render_scene(0, "train", index)
        pixels = np.asarray(Image.open(demo / "images" / f"train_{index:04d}.jpg"), dtype=np.float64)
        for obj in scene.objects:
            core = _erode(obj.mask)
            core = core if core.any() else obj.mask
            ring = _dilate(_dilate(obj.mask)) & ~obj.mask
            difference = np.linalg.norm(pixels[core].mean(axis=0) - pixels[ring].mean(axis=0))
            assert difference > 40, f"train_{index:04d}: object {obj.category_id} blends in ({difference:.0f})"


def test_scenes_vary_in_size_count_shape_and_overlap() -> None:
    scenes = [render_scene(7, "train", index) for index in range(20)]
    sizes = {scene.image.shape[:2] for scene in scenes}
    counts = [len(scene.objects) for scene in scenes]
    boxes = [obj.bbox for scene in scenes for obj in scene.objects]
    extents = [max(w, h) for _, _, w, h in boxes]
    assert len(sizes) == 20
    assert all(300 <= side <= 900 for size in sizes for side in size)
    assert all(1 <= count <= MAX_OBJECTS for count in counts) and len(set(counts)) >= 3
    assert len({obj.category_id for scene in scenes for obj in scene.objects}) >= 4
    assert min(extents) < 40 and max(extents) > 200
    assert any(_boxes_overlap(scene.objects) for scene in scenes)


def test_some_objects_are_cut_by_the_image_border() -> None:
    """Real photos cut objects at the border; a refiner must not learn that every object lies inside."""
    scenes = [render_scene(7, "train", index) for index in range(20)]
    cut = 0
    for scene in scenes:
        height, width = scene.image.shape[:2]
        for obj in scene.objects:
            x, y, w, h = obj.bbox
            cut += x == 0 or y == 0 or x + w == width or y + h == height
    objects = sum(len(scene.objects) for scene in scenes)
    assert 0.05 * objects < cut < 0.6 * objects


def test_max_objects_bounds_every_scene() -> None:
    assert all(len(render_scene(3, "val", index, max_objects=2).objects) <= 2 for index in range(10))


def _boxes_overlap(objects: list) -> bool:
    boxes = [obj.bbox for obj in objects]
    return any(
        a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
    )


def test_rerun_with_fewer_images_removes_only_stale_demo_images(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, n_train=3, n_val=2)
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "images" / "photo.jpg").write_bytes(b"keep me")
    make_demo_dataset(tmp_path, n_train=2, n_val=1)
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == ["photo.jpg", "train_0000.jpg", "train_0001.jpg", "val_0000.jpg"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert len(json.loads((tmp_path / "train.json").read_text())["images"]) == 2


def test_unwritable_output_is_a_refine_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RefineError, match="cannot write"):
        make_demo_dataset(blocker, n_train=1, n_val=1)


def test_cli_writes_the_dataset_and_reports_counts(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path), "--n-train", "2", "--n-val", "1"])
    assert result.exit_code == 0, result.output
    summary = make_demo_dataset(tmp_path / "again", n_train=2, n_val=1)
    expected = f"({summary['train']['annotations']} + {summary['val']['annotations']} boxes)"
    assert "wrote 2 train + 1 val images" in result.output and expected in result.output
    assert (tmp_path / "train.json").is_file() and (tmp_path / "val.json").is_file()


def test_cli_error_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["demo-data", "--out", str(blocker), "--n-train", "1", "--n-val", "1"])
    assert result.exit_code == 1
    assert "cannot write the demo dataset" in result.output
