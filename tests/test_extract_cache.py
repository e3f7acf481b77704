"""Cache semantics of `refine extract`: what is a hit, what is a miss, and namespaces never mix."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.hqsam.encoder
import pipeline.extraction.extract
from pipeline.devices import native_bf16, resolve_encoder_amp
from pipeline.errors import RefineError
from pipeline.manifest import manifest_images
from pipeline.hqsam.encoder import ENCODERS, build_encoder, identity_for
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.extract import run_extract
from pipeline.store import FeatureStore, Namespace
from tests.helpers import extract_args, files_under, write_coco


@pytest.fixture
def encoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts images through the real encoder (a spy around the real forward, not a stand-in)."""
    calls: list[int] = []
    real_forward = pipeline.hqsam.encoder.FeatureEncoder.forward

    def counting_forward(self, pixels, resized_hw):
        calls.append(pixels.shape[0])
        return real_forward(self, pixels, resized_hw)

    monkeypatch.setattr(pipeline.hqsam.encoder.FeatureEncoder, "forward", counting_forward)
    return calls


def extract(data: dict, **overrides) -> pipeline.extraction.extract.ExtractSummary:
    options = dict(images=data["images"], store=str(data["store"]), annotations=data["annotations"], workers=0)
    options.update(overrides)
    return run_extract(ExtractConfig(**options))


def test_rerun_on_unchanged_dataset_never_calls_the_encoder(dataset, encoder_calls):
    before = files_under(dataset["store"])
    summary = extract(dataset)
    assert encoder_calls == []
    assert (summary.hits, summary.computed, summary.failed) == (4, 0, [])
    assert files_under(dataset["store"]) == before  # not even a new segment


def test_renamed_moved_and_copied_images_are_hits(dataset, encoder_calls):
    images = dataset["images"]
    first, second, third, fourth = sorted(images.iterdir())
    first.rename(images / "renamed.png")
    (images / "sub").mkdir()
    second.rename(images / "sub" / "moved.png")
    shutil.copy(third, images / "copy-of-third.png")
    files = [images / "renamed.png", images / "sub" / "moved.png", third, images / "copy-of-third.png", fourth]
    annotations = write_coco(dataset["root"] / "moved.json", images, files)
    summary = extract(dataset, annotations=annotations)
    assert encoder_calls == []
    assert (summary.images, summary.unique, summary.hits, summary.computed) == (5, 4, 4, 0)
    manifest = Namespace.open(FeatureStore(dataset["store"]), summary.fingerprint).manifest("moved")
    images = manifest_images(manifest, "test")
    keys = dict(zip(images.file_names, images.keys, strict=True))
    assert keys["copy-of-third.png"] == keys[third.name]


def test_changed_pixels_are_a_miss(dataset, encoder_calls):
    path = dataset["files"][0]
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0] ^= 1  # one pixel, one bit
    Image.fromarray(pixels).save(path)
    summary = extract(dataset)
    assert sum(encoder_calls) == 1
    assert (summary.hits, summary.computed) == (3, 1)


def test_new_images_only_are_encoded_and_manifest_grows(dataset, encoder_calls):
    from tests.helpers import write_images

    extra = write_images(dataset["images"], 1, seed=99, prefix="extra")
    files = sorted(p for p in dataset["images"].iterdir())
    annotations = write_coco(dataset["annotations"], dataset["images"], files)
    summary = extract(dataset, annotations=annotations)
    assert sum(encoder_calls) == 1 and summary.hits == 4
    manifest = Namespace.open(FeatureStore(dataset["store"]), summary.fingerprint).manifest("train")
    assert extra[0].name in manifest_images(manifest, "test").file_names


def test_other_checkpoint_or_seed_goes_to_another_namespace(dataset, tmp_path, encoder_calls):
    # A checkpoint made the way a user would: the state dict of an encoder, saved to disk.
    identity = identity_for("vit_tiny", None, seed=7)
    state = {f"image_encoder.{k}": v for k, v in build_encoder(identity, None, seed=7).state_dict().items()}
    checkpoint = tmp_path / "sam_hq_vit_tiny.pth"
    torch.save(state, checkpoint)

    first = dataset["files"][:1]
    annotations = write_coco(tmp_path / "one.json", dataset["images"], first)
    with_checkpoint = extract(dataset, annotations=annotations, checkpoint=checkpoint)
    with_seed = extract(dataset, annotations=annotations, seed=7)
    assert sum(encoder_calls) == 2  # neither reuses the seed-0 entries
    store = FeatureStore(dataset["store"])
    fingerprints = {with_checkpoint.fingerprint, with_seed.fingerprint}
    assert len(fingerprints | set(store.fingerprints())) == 3
    # The checkpoint path loads exactly the weights it was saved from.
    read = {}
    for summary in (with_checkpoint, with_seed):
        namespace = Namespace.open(store, summary.fingerprint)
        read[summary.fingerprint] = namespace.read(next(iter(namespace.entries().values())))
    a, b = read.values()
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    provenance = Namespace.open(store, with_checkpoint.fingerprint).provenance
    assert provenance["checkpoint_name"] == "sam_hq_vit_tiny.pth" and provenance["random_init"] is False
    assert str(tmp_path) not in str(provenance)  # no machine paths in the store


def test_each_encoder_type_has_its_own_fingerprint():
    fingerprints = {identity_for(name, None).fingerprint for name in ENCODERS}
    assert len(fingerprints) == len(ENCODERS)


def test_entries_hold_float16_features_and_sizes(base_dataset):
    store = FeatureStore(base_dataset["store"])
    (fingerprint,) = store.fingerprints()
    namespace = Namespace.open(store, fingerprint)
    manifest = namespace.manifest("train")
    entries = namespace.entries()
    for key, file in zip(manifest_images(manifest, "test").keys, base_dataset["files"], strict=True):
        with Image.open(file) as opened:
            width, height = opened.size
        entry = entries[key]
        assert entry.original_size == (height, width)
        assert max(entry.resized_size) == 1024
        embedding, early = namespace.read(entry, check=True)
        assert embedding.shape == (256, 64, 64) and early.shape == (160, 64, 64)
        assert embedding.dtype == np.float16 and early.dtype == np.float16
        assert np.isfinite(embedding).all() and embedding.astype(np.float32).std() > 0


def _fresh_forward(images: Path, file_name: str, amp: torch.dtype | None) -> tuple[np.ndarray, np.ndarray]:
    """The real encoder's features of one image, computed here under autocast to `amp` (None: fp32)."""
    from pipeline.devices import autocast
    from pipeline.hqsam.encoder import FeatureEncoder
    from pipeline.images import prepare

    pixels, _, resized = prepare(images / file_name)
    model = FeatureEncoder(build_encoder(identity_for("vit_tiny", None), None))
    cpu = torch.device("cpu")
    with torch.inference_mode(), autocast(cpu, amp):
        embedding, early = model(torch.from_numpy(pixels)[None], torch.tensor([resized]))
    return embedding[0].half().numpy(), early[0].half().numpy()


def test_features_match_a_fresh_encoder_forward(base_dataset):
    """What the store holds is what the real encoder computes for the image (fp16 rounding aside); the
    shared store is extracted with --amp off."""
    store = FeatureStore(base_dataset["store"])
    namespace = Namespace.open(store, store.fingerprints()[0])
    images = manifest_images(namespace.manifest("train"), "test")
    entry = namespace.entries()[images.keys[0]]
    assert namespace.read_commit(entry.segment).computed_with["autocast"] == "off"
    expected = _fresh_forward(base_dataset["images"], images.file_names[0], None)
    for stored, fresh in zip(namespace.read(entry), expected, strict=True):
        np.testing.assert_allclose(stored, fresh, rtol=1e-3, atol=1e-3)


def test_default_precision_is_bf16_where_native_and_within_its_rounding_of_fp32(base_dataset, tmp_path, cli):
    first = base_dataset["files"][:1]
    annotations = write_coco(tmp_path / "one.json", base_dataset["images"], first)
    result = cli(*extract_args(base_dataset["images"], annotations, tmp_path / "auto.zarr"))
    assert result.exit_code == 0, result.output
    store = FeatureStore(tmp_path / "auto.zarr")
    namespace = Namespace.open(store, store.fingerprints()[0])
    assert namespace.fingerprint == FeatureStore(base_dataset["store"]).fingerprints()[0]  # one namespace for both
    ((key, entry),) = namespace.entries().items()
    amp = resolve_encoder_amp("auto", torch.device("cpu"))
    recorded = namespace.read_commit(entry.segment).computed_with["autocast"]
    assert recorded == ("bf16" if amp == torch.bfloat16 else "off")  # bf16 exactly where the CPU computes it
    stored = namespace.read(entry)
    for value, fresh in zip(stored, _fresh_forward(base_dataset["images"], first[0].name, amp), strict=True):
        np.testing.assert_allclose(value, fresh, rtol=1e-3, atol=1e-3)
    # bf16 is the same feature within its rounding: measured 2.3% (embedding) and 1.0% (early) relative error
    # against fp32 with random weights, whose depth amplifies the rounding.
    stored_fp32 = Namespace.open(FeatureStore(base_dataset["store"]), namespace.fingerprint)
    for value, fp32 in zip(stored, stored_fp32.read(stored_fp32.entries()[key]), strict=True):
        value, fp32 = value.astype(np.float32), fp32.astype(np.float32)
        assert np.linalg.norm(value - fp32) < 0.05 * np.linalg.norm(fp32)


def test_encoder_amp_resolution():
    cpu = torch.device("cpu")
    assert resolve_encoder_amp("off", cpu) is None
    assert resolve_encoder_amp("bf16", cpu) == torch.bfloat16
    assert resolve_encoder_amp("auto", cpu) == (torch.bfloat16 if native_bf16(cpu) else None)
    with pytest.raises(RefineError, match="choose auto, bf16 or off"):
        resolve_encoder_amp("fp16", cpu)


def test_shards_keep_the_file_count_well_below_the_image_count(dataset):
    # The 4 images went through in one batch: one shard file per array (embedding, early, plane), not per image.
    data_files = [p for p in (dataset["store"]).rglob("*") if p.is_file() and "/c/" in p.as_posix()]
    assert sorted(p.parts[-6] for p in data_files) == ["early", "embedding", "plane"]
