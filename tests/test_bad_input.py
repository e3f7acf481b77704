"""Bad input to `refine extract`: one clear line naming the file and entry, exit 1, nothing lost."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from tests.conftest import write_coco
from tests.test_extract_cache import files_under


def run(cli, data: dict, *extra: str, annotations: Path | None = None):
    return cli(
        "extract", "--images", data["images"], "--store", data["store"],
        "--annotations", annotations or data["annotations"], "--workers", "0", *extra,
    )


def assert_clean_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def edit_coco(data: dict, change) -> Path:
    coco = json.loads(data["annotations"].read_text())
    change(coco)
    path = data["root"] / "edited.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize(
    "change, fragments",
    [
        (lambda c: c["annotations"][0].update(bbox=[1, 1, float("nan"), 4]), ["annotation id=100", "NaN"]),
        (lambda c: c["annotations"][0].update(bbox=[1, 1, 0, 4]), ["annotation id=100", "zero or negative size"]),
        (lambda c: c["annotations"][0].update(bbox=[1, 1, -3, 4]), ["annotation id=100", "zero or negative size"]),
        (lambda c: c["annotations"][0].update(bbox=[500, 1, 10, 4]), ["annotation id=100", "outside image 1"]),
        (lambda c: c["images"].append(dict(c["images"][0])), ["duplicate image id 1"]),
        (lambda c: c["annotations"].append(dict(c["annotations"][0])), ["duplicate annotation id 100"]),
        (lambda c: c["annotations"][0].update(image_id=77), ["annotation id=100", "image_id 77 is not in 'images'"]),
        (lambda c: c["images"][0].update(file_name="../outside.png"), ["image id=1", "escapes the image root"]),
        (lambda c: c["images"][0].update(file_name="gone.png"), ["image id=1", "'gone.png' not found"]),
        (lambda c: c["annotations"][0].update(category_id="cat"), ["annotation id=100", "'category_id' must be an integer"]),
    ],
    ids=["nan-box", "zero-size", "negative-size", "outside", "dup-image", "dup-annotation", "unknown-image",
         "escapes-root", "missing-image", "category-type"],
)
def test_invalid_annotations_stop_before_any_work(cli, dataset, change, fragments):
    before = files_under(dataset["store"])
    edited = edit_coco(dataset, change)
    result = run(cli, dataset, annotations=edited)
    assert_clean_error(result, "edited.json", *fragments)
    assert files_under(dataset["store"]) == before


def test_malformed_json_names_the_position(cli, dataset):
    broken = dataset["root"] / "broken.json"
    broken.write_text('{"images": [\n  {"id": 1,,}\n]}')
    assert_clean_error(run(cli, dataset, annotations=broken), "broken.json:2:", "malformed JSON")


def test_missing_image_directory(cli, dataset):
    result = cli("extract", "--images", dataset["root"] / "nope", "--store", dataset["store"])
    assert_clean_error(result, "nope", "image directory not found")


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "not a readable image"),
        (b"this is not an image at all", "not a readable image"),
        ("truncated", "truncated or corrupt"),
    ],
    ids=["zero-bytes", "not-an-image", "truncated-jpeg"],
)
def test_unreadable_images_are_reported_and_the_rest_committed(cli, dataset, content, fragment):
    bad = dataset["images"] / "bad.jpg"
    if content == "truncated":
        from PIL import Image

        Image.new("RGB", (64, 48), (200, 30, 30)).save(bad, quality=95)
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        bad.write_bytes(content)
    files = sorted(p for p in dataset["images"].iterdir() if p.name != "bad.jpg")
    coco = json.loads(write_coco(dataset["root"] / "with-bad.json", dataset["images"], files).read_text())
    coco["images"].append({"id": 50, "file_name": "bad.jpg", "width": 64, "height": 48})
    annotations = dataset["root"] / "with-bad.json"
    annotations.write_text(json.dumps(coco))

    result = run(cli, dataset, annotations=annotations)
    assert_clean_error(result, "1 image(s) failed")
    assert "bad.jpg" in result.stderr and fragment in result.stderr and "image id=50" in result.stderr
    verify = cli("store", "verify", dataset["store"])
    assert verify.exit_code == 0, verify.output
    # Failed runs write no manifest for the incomplete dataset; --skip-bad-images writes one without it.
    skipped = run(cli, dataset, "--skip-bad-images", annotations=annotations)
    assert skipped.exit_code == 0, skipped.output
    manifests = list(dataset["store"].glob("*/datasets/with-bad.json"))
    manifest = json.loads(manifests[0].read_text())
    assert manifest["skipped"] == ["bad.jpg"] and len(manifest["images"]) == 4


def test_unwritable_store_path(cli, dataset):
    blocker = dataset["root"] / "a-file"
    blocker.write_text("not a folder")
    result = run(cli, dataset, "--dataset", "x").__class__  # keep linters quiet about unused helper
    result = cli("extract", "--images", dataset["images"], "--store", blocker / "store.zarr", "--workers", "0")
    assert_clean_error(result, "a-file", "cannot open the feature store")


@pytest.mark.parametrize(
    "prepare, fragment",
    [
        (lambda p: p.mkdir() or (p / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})),
         "of another format"),
        (lambda p: p.mkdir() or (p / ".zgroup").write_text("{}"), "Zarr v2"),
        (lambda p: p.mkdir() or (p / "notes.txt").write_text("hello"), "not a refine feature store"),
        (lambda p: p.write_text("file"), "is a file"),
    ],
    ids=["other-zarr3", "zarr2", "other-folder", "file"],
)
def test_store_of_another_format_is_refused_and_left_alone(cli, dataset, prepare, fragment):
    other = dataset["root"] / "other.zarr"
    prepare(other)
    before = files_under(other) if other.is_dir() else {other.read_text()}
    result = cli("extract", "--images", dataset["images"], "--store", other, "--workers", "0")
    assert_clean_error(result, "other.zarr", fragment)
    assert (files_under(other) if other.is_dir() else {other.read_text()}) == before


def test_checkpoint_of_another_model_type(cli, dataset, tmp_path):
    checkpoint = tmp_path / "sam_hq_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, checkpoint)
    result = run(cli, dataset, "--checkpoint", checkpoint)
    assert_clean_error(result, "sam_hq_vit_b.pth", "does not fit encoder vit_tiny", "looks like a vit_b checkpoint")


def test_corrupt_checkpoint(cli, dataset, tmp_path):
    checkpoint = tmp_path / "broken.pth"
    checkpoint.write_bytes(b"\x80\x04garbage" * 10)
    assert_clean_error(run(cli, dataset, "--checkpoint", checkpoint), "broken.pth", "not a readable PyTorch state dict")


class Payload:
    """Anything but a state dict; weights_only loading must refuse to build it."""


def test_pickle_that_is_not_a_state_dict_is_never_unpickled(cli, dataset, tmp_path):
    checkpoint = tmp_path / "evil.pth"
    with checkpoint.open("wb") as f:
        pickle.dump(Payload(), f)
    assert_clean_error(run(cli, dataset, "--checkpoint", checkpoint), "evil.pth", "not a readable PyTorch state dict")


def test_usage_errors_exit_2(cli, dataset):
    assert cli("extract", "--images", dataset["images"]).exit_code == 2  # --store missing
    result = cli("extract", "--images", dataset["images"], "--store", dataset["store"], "--encoder", "vit_xxl")
    assert result.exit_code == 2


def test_annotated_size_that_does_not_match_the_image(cli, dataset):
    edited = edit_coco(dataset, lambda c: c["images"][0].update(width=c["images"][0]["width"] + 7))
    result = run(cli, dataset, annotations=edited)
    assert_clean_error(result, "1 image(s) failed")
    assert "image id=1" in result.stderr and "but the annotations say" in result.stderr
