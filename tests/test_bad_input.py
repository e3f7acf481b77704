"""Bad input to every command: one clear line naming the file and entry, exit 1 (2 for a usage error),
nothing lost. The corpus covers annotation files, image files, results files, encoder and refiner
checkpoints, stores and command-line options."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch


from pipeline.manifest import manifest_images
from tests.helpers import assert_clean_error, files_under, write_coco


def run(cli, data: dict, *extra: str, annotations: Path | None = None):
    return cli(
        "extract",
        "--images",
        data["images"],
        "--store",
        data["store"],
        "--annotations",
        annotations or data["annotations"],
        "--workers",
        "0",
        *extra,
    )


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
        (
            lambda c: c["annotations"][0].update(category_id="cat"),
            ["annotation id=100", "'category_id' must be an integer"],
        ),
    ],
    ids=[
        "nan-box",
        "zero-size",
        "negative-size",
        "outside",
        "dup-image",
        "dup-annotation",
        "unknown-image",
        "escapes-root",
        "missing-image",
        "category-type",
    ],
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
    assert manifest["skipped"] == ["bad.jpg"] and len(manifest_images(manifest, "test")) == 4


def test_unwritable_store_path(cli, dataset):
    blocker = dataset["root"] / "a-file"
    blocker.write_text("not a folder")
    result = run(cli, dataset, "--dataset", "x").__class__  # keep linters quiet about unused helper
    result = cli("extract", "--images", dataset["images"], "--store", blocker / "store.zarr", "--workers", "0")
    assert_clean_error(result, "a-file", "cannot open the feature store")


@pytest.mark.parametrize(
    "prepare, fragment",
    [
        (
            lambda p: (
                p.mkdir()
                or (p / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
            ),
            "of another format",
        ),
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


# -- more of the corpus: COCO entries, images, results files, refiner checkpoints, options ----------------
@pytest.mark.parametrize(
    "change, fragments",
    [
        (lambda c: c["annotations"][0].update(bbox=[1, 1, float("inf"), 4]), ["annotation id=100", "NaN or infinite"]),
        (lambda c: c["annotations"][0].update(bbox=[1, 1, 4]), ["annotation id=100", "must be [x, y, w, h]"]),
        (lambda c: c["annotations"][0].update(bbox=["1", "1", "4", "4"]), ["annotation id=100", "must hold numbers"]),
        (lambda c: c["images"][0].update(file_name="/etc/passwd"), ["image id=1", "escapes the image root"]),
        (lambda c: c["images"][0].update(file_name="..\\..\\secret.png"), ["image id=1", "escapes the image root"]),
        (lambda c: c["images"][0].update(file_name="sub/../../x.png"), ["image id=1", "escapes the image root"]),
        (lambda c: c["images"][0].update(width=0, height=0), ["image id=1", "size 0 x 0 must be at least 1 x 1"]),
        (lambda c: c["images"][0].update(id="1"), ["images[0]", "'id' must be an integer"]),
        (lambda c: c["annotations"][0].update(image_id=True), ["annotation id=100", "'image_id' must be an integer"]),
        (lambda c: c.update(images={"1": "img0.png"}), ["not a COCO dataset"]),
    ],
    ids=[
        "inf-box",
        "three-numbers",
        "string-numbers",
        "absolute-path",
        "backslash-escape",
        "nested-escape",
        "zero-size-image",
        "string-image-id",
        "bool-image-id",
        "images-not-a-list",
    ],
)
def test_more_invalid_annotations_stop_before_any_work(cli, dataset, change, fragments):
    before = files_under(dataset["store"])
    result = run(cli, dataset, annotations=edit_coco(dataset, change))
    assert_clean_error(result, "edited.json", *fragments)
    assert files_under(dataset["store"]) == before


def test_huge_image_is_refused_before_decoding(cli, dataset):
    from PIL import Image

    huge = dataset["images"] / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)  # 1 bit per pixel: 50 MB in memory, a small file
    coco = json.loads(dataset["annotations"].read_text())
    coco["images"].append({"id": 60, "file_name": "huge.png", "width": 20000, "height": 20000})
    annotations = dataset["root"] / "huge.json"
    annotations.write_text(json.dumps(coco))
    result = run(cli, dataset, annotations=annotations)
    assert_clean_error(result, "1 image(s) failed")
    assert (
        "huge.png" in result.stderr
        and "image too large" in result.stderr
        and "400000000 pixels" in result.stderr
        and "image id=60" in result.stderr
    )
    assert cli("store", "verify", dataset["store"]).exit_code == 0


def test_one_pixel_image_is_valid_input(cli, dataset):
    """Not an error: a 1 x 1 image is encoded (resized to 1024 x 1024) and its box maps back exactly."""
    from PIL import Image

    Image.new("RGB", (1, 1), (9, 99, 199)).save(dataset["images"] / "dot.png")
    coco = {
        "images": [{"id": 1, "file_name": "dot.png", "width": 1, "height": 1}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}],
    }
    annotations = dataset["root"] / "dot.json"
    annotations.write_text(json.dumps(coco))
    result = run(cli, dataset, annotations=annotations)
    assert result.exit_code == 0, result.output
    (manifest,) = dataset["store"].glob("*/datasets/dot.json")
    assert manifest_images(json.loads(manifest.read_text()), "test").resized_size(0) == (1024, 1024)


def _detections(base_dataset: dict) -> list[dict]:
    coco = json.loads(base_dataset["annotations"].read_text())
    return [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.5} for a in coco["annotations"]]


@pytest.mark.parametrize(
    "content, fragments",
    [
        ({"not": "a list"}, ["neither a COCO results list nor a COCO dataset"]),
        ([["not", "an", "object"]], ["detection [0]", "expected an object"]),
        ([{"image_id": "1", "bbox": [1, 1, 5, 5]}], ["detection [0]", "'image_id' must be an integer"]),
        ([{"image_id": 1, "bbox": [1, float("nan"), 5, 5]}], ["detection [0]", "NaN or infinite"]),
        ([{"image_id": 1, "bbox": [6000, 1, 50, 5]}], ["detection [0]", "does not overlap image 1"]),
        ([{"image_id": 1, "bbox": [1, 1, -5, 5]}], ["detection [0]", "zero or negative size"]),
        ([{"image_id": 424242, "bbox": [1, 1, 5, 5]}], ["have no features", "424242"]),
    ],
    ids=[
        "results-not-a-list",
        "detection-not-object",
        "string-image-id",
        "nan-detection",
        "outside-detection",
        "negative-detection",
        "unknown-image-id",
    ],
)
def test_bad_results_files_for_apply_leave_earlier_output_intact(
    cli, base_dataset, trained, tmp_path, content, fragments
):
    boxes = tmp_path / "detections.json"
    boxes.write_text(json.dumps(content))
    out = tmp_path / "refined.json"
    out.write_text("earlier output")
    result = cli("apply", "--store", base_dataset["store"], "--boxes", boxes, "--model", trained, "--out", out)
    assert_clean_error(result, "detections.json", *fragments)
    assert out.read_text() == "earlier output"


@pytest.mark.parametrize(
    "content, fragments",
    [
        ({"not": "a list"}, ["not a COCO results file"]),
        ([{"image_id": 1, "bbox": [1, 1, float("inf"), 5]}], ["detection [0]", "NaN or infinite"]),
        ([{"image_id": 77, "bbox": [1, 1, 5, 5]}], ["detection [0]", "image_id 77 is not in"]),
    ],
    ids=["train-results-not-a-list", "train-inf-detection", "train-unknown-image"],
)
def test_bad_coarse_boxes_for_train_keep_the_earlier_model(cli, base_dataset, trained, tmp_path, content, fragments):
    out = tmp_path / "refiner"
    out.mkdir()
    shutil.copy(trained, out / "model.pt")
    before = (out / "model.pt").read_bytes()
    coarse = tmp_path / "coarse.json"
    coarse.write_text(json.dumps(content))
    result = cli(
        "train",
        "--store",
        base_dataset["store"],
        "--annotations",
        base_dataset["annotations"],
        "--out",
        out,
        "--coarse",
        coarse,
        "--epochs",
        "1",
    )
    assert_clean_error(result, "coarse.json", *fragments)
    assert (out / "model.pt").read_bytes() == before


def _garbage(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04 not really a zip" * 20)


def _encoder_state(path: Path) -> None:
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(64, 3, 4, 4)}, path)


def _older_version(path: Path) -> None:
    torch.save({"format": "refine-refiner", "version": 1, "model": {}}, path)


def _pickled_object(path: Path) -> None:
    with path.open("wb") as f:
        pickle.dump(Payload(), f)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (_garbage, "not a readable refiner checkpoint"),
        (_encoder_state, "not a refine refiner checkpoint"),
        (_pickled_object, "not a readable refiner checkpoint"),
        (_older_version, "refiner checkpoint version 1, this refine reads version 6; train the refiner again"),
        (None, "model checkpoint not found"),
    ],
    ids=["garbage-model", "encoder-checkpoint-as-model", "pickle-as-model", "older-version-model", "missing-model"],
)
def test_bad_refiner_checkpoints_are_refused(cli, base_dataset, tmp_path, make, fragment):
    model = tmp_path / "model.pt"
    if make is not None:
        make(model)
    result = cli(
        "apply",
        "--store",
        base_dataset["store"],
        "--boxes",
        base_dataset["annotations"],
        "--model",
        model,
        "--out",
        tmp_path / "out.json",
    )
    assert_clean_error(result, "model.pt", fragment)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("train", "--noise", "0.9"),
        ("train", "--epochs", "0"),
        ("train", "--batch-size", "0"),
        ("train", "--amp", "fp8"),
        ("extract", "--batch-size", "0"),
        ("extract", "--device", "tpu"),
        ("extract", "--amp", "fp16"),  # known to produce garbage with ViT-H: not offered
        ("store", "gc", "--grace", "-1"),
    ],
    ids=[
        "noise-too-big",
        "zero-epochs",
        "zero-batch",
        "unknown-amp",
        "extract-zero-batch",
        "unknown-device",
        "extract-fp16",
        "negative-grace",
    ],
)
def test_out_of_range_options_are_usage_errors(cli, base_dataset, tmp_path, args):
    common = {
        "train": ["--store", base_dataset["store"], "--annotations", base_dataset["annotations"], "--out", tmp_path],
        "extract": ["--images", base_dataset["images"], "--store", tmp_path / "s.zarr"],
        "store": [base_dataset["store"]],
    }[args[0]]
    head = list(args[:2]) if args[0] == "store" else [args[0]]
    result = cli(*head, *common, *args[len(head) :])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "model.pt").exists()


def test_a_device_that_is_not_there(cli, dataset):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_clean_error(run(cli, dataset, "--device", "cuda"), "--device cuda", "no CUDA device")


def test_a_store_that_does_not_exist(cli, base_dataset, trained, tmp_path):
    result = cli(
        "evaluate",
        "--store",
        tmp_path / "nowhere.zarr",
        "--annotations",
        base_dataset["annotations"],
        "--model",
        trained,
        "--out",
        tmp_path / "eval",
    )
    assert_clean_error(result, "nowhere.zarr", "no feature store here")
    assert not (tmp_path / "nowhere.zarr").exists()
