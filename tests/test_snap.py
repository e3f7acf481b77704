"""Zero-shot snap: the package's own predictor's masks from stored features, its weights only, clear errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import pipeline.hqsam.encoder
from pipeline.inference.apply import image_entries
from pipeline.boxes import coco_to_xyxy
from pipeline.hqsam.encoder import build_seeded_sam, identity_for
from pipeline.errors import RefineError
from pipeline.images import load_rgb, resized_shape
from pipeline.inference.snap import MASK_THRESHOLD, masks_to_rle, snap_boxes, tight_boxes
from pipeline.inference.snapper import build_snapper
from pipeline.store import Entry, FeatureStore, Namespace
from pipeline.store.writer import SegmentWriter

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the package imports timm through paths timm has deprecated
    from segment_anything_hq import SamPredictor
    from segment_anything_hq.modeling import ImageEncoderViT, Sam, TinyViT

CPU = torch.device("cpu")
OPTIONS = [(multimask, hq_only) for multimask in (False, True) for hq_only in (False, True)]
# The package's batched and one-box predictions differ by ~1e-6 in their logits (CPU kernels round
# differently for other batch sizes); a pixel may flip between them only this close to the threshold.
BATCH_ROUNDING = 1e-4


def tiny_namespace(base_dataset: dict) -> Namespace:
    store = FeatureStore(base_dataset["store"])
    return Namespace.open(store, store.fingerprints()[0])


def first_entry(namespace: Namespace) -> Entry:
    entries = image_entries(namespace, None)
    return entries[next(iter(entries))][1]


def synthetic_namespace(root: Path, model_type: str, size: tuple[int, int] = (90, 120)) -> tuple[Namespace, Entry]:
    """A namespace of `model_type`'s random init holding one entry of random features at the real scales
    (embedding std ~1, early feature ~0.003): a vit_b extraction would take a minute on CPU."""
    identity = identity_for(model_type, None)
    namespace = Namespace.ensure(FeatureStore(root / "features.zarr", create=True), identity.provenance())
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((1, 256, 64, 64), dtype=np.float32).astype(np.float16)
    early = (rng.standard_normal((1, identity.early_channels, 64, 64), dtype=np.float32) * 0.003).astype(np.float16)
    SegmentWriter(namespace, identity.early_channels, 1, planes=False).write_batch(
        ["k0"], embedding, early, [size], [resized_shape(*size)]
    )
    return namespace, namespace.entries()["k0"]


def predictor_on(sam: Sam, namespace: Namespace, entry: Entry) -> SamPredictor:
    """The package's predictor, its image "set" from the stored float16 features (as float32), not encoded."""
    embedding, early = namespace.read(entry, check=True)
    predictor = SamPredictor(sam)
    predictor.features = torch.tensor(embedding[None], dtype=torch.float32)
    # The image encoder returns interm_embeddings channels last: 1 x 64 x 64 x C.
    predictor.interm_features = [torch.tensor(early[None], dtype=torch.float32).permute(0, 2, 3, 1)]
    predictor.original_size = entry.original_size
    predictor.input_size = entry.resized_size
    predictor.is_image_set = True
    return predictor


def coco_boxes(masks: torch.Tensor) -> torch.Tensor:
    """The tight boxes of N x H x W masks as pycocotools computes them, xyxy."""
    rles = mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8)))
    return coco_to_xyxy(mask_utils.toBbox(rles).tolist())


def some_boxes(entry: Entry) -> torch.Tensor:
    height, width = entry.original_size
    return torch.tensor(
        [[0.25 * width, 0.2 * height, 0.8 * width, 0.7 * height], [3.0, 5.0, 0.5 * width, 0.9 * height]]
    )


# -- exactness ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["vit_tiny", "vit_b"])
def test_snap_gives_the_package_predictors_masks_from_stored_features(
    model_type: str, base_dataset: dict, tmp_path: Path
) -> None:
    if model_type == "vit_tiny":
        namespace = tiny_namespace(base_dataset)
        entry = first_entry(namespace)
    else:
        namespace, entry = synthetic_namespace(tmp_path, model_type)
    snapper = build_snapper(namespace)
    predictor = predictor_on(build_seeded_sam(model_type), namespace, entry)
    boxes = some_boxes(entry)
    assert MASK_THRESHOLD == Sam.mask_threshold
    for multimask, hq_only in OPTIONS:
        snapped = snap_boxes(
            snapper, namespace, entry, boxes, CPU, multimask_output=multimask, hq_token_only=hq_only, return_masks=True
        )
        # The package's own batched path, as SAM users prompt many boxes: the same arithmetic, to the bit.
        masks, iou, _ = predictor.predict_torch(
            None,
            None,
            boxes=predictor.transform.apply_boxes_torch(boxes, entry.original_size),
            multimask_output=multimask,
            hq_token_only=hq_only,
        )
        assert snapped.masks is not None and torch.equal(snapped.masks, masks[:, 0])
        assert 0 < snapped.masks.float().mean() < 1  # real masks, not all or nothing
        assert torch.equal(snapped.boxes, coco_boxes(masks[:, 0]))
        assert torch.equal(snapped.scores, iou[:, 0].clamp(0, 1)) and not snapped.kept_coarse.any()
        # One box through `predict`: the same mask but where the package itself rounds its logits
        # differently for a batch of one.
        logits, scores, _ = predictor.predict(
            box=boxes[0].numpy(), multimask_output=multimask, hq_token_only=hq_only, return_logits=True
        )
        differ = snapped.masks[0].numpy() != (logits[0] > predictor.model.mask_threshold)
        assert (np.abs(logits[0][differ]) < BATCH_ROUNDING).all()
        assert snapped.scores[0].item() == pytest.approx(float(np.clip(scores[0], 0, 1)), abs=1e-5)


def test_stored_float16_features_give_nearly_the_masks_of_live_float32_ones(base_dataset: dict) -> None:
    """The whole chain against the package run end to end on the image (its preprocessing, its encoder in
    float32, its predictor): what storing the features costs the masks.

    Float16 rounds each feature by at most 2^-11 of its size; measured here, that moves the decoder's logits
    by ~1.5e-4 against a spread of ~0.13 (random weights: a trained model's logits spread far more), so
    ~3e-4 of the pixels lie that close to the threshold and ~5e-5 flip: mask IoU >= 0.9985, boxes equal.
    The bounds leave a few times that: IoU >= 0.99, box sides within 2 pixels.
    """
    namespace = tiny_namespace(base_dataset)
    entries = image_entries(namespace, None)
    record, entry = entries[next(iter(entries))]
    sam = build_seeded_sam("vit_tiny")
    live = SamPredictor(sam)
    live.set_image(np.asarray(load_rgb(base_dataset["images"] / record.file_name)))
    snapper = build_snapper(namespace)
    boxes = some_boxes(entry)
    for multimask, hq_only in [(False, False), (True, True)]:  # SAM's and the HQ token's masks
        snapped = snap_boxes(
            snapper, namespace, entry, boxes, CPU, multimask_output=multimask, hq_token_only=hq_only, return_masks=True
        )
        masks, _, _ = live.predict_torch(
            None,
            None,
            boxes=live.transform.apply_boxes_torch(boxes, entry.original_size),
            multimask_output=multimask,
            hq_token_only=hq_only,
        )
        assert snapped.masks is not None
        live_masks = masks[:, 0]
        overlap = (snapped.masks & live_masks).flatten(1).sum(1) / (snapped.masks | live_masks).flatten(1).sum(1)
        assert (overlap >= 0.99).all(), overlap
        assert (snapped.boxes - coco_boxes(live_masks)).abs().max() <= 2.0


def test_snap_never_runs_the_image_encoder(base_dataset: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__}.forward ran")

    for encoder in (TinyViT, ImageEncoderViT, pipeline.hqsam.encoder.FeatureEncoder):
        monkeypatch.setattr(encoder, "forward", refuse)
    namespace = tiny_namespace(base_dataset)
    snapper = build_snapper(namespace)
    assert not any(isinstance(module, (TinyViT, ImageEncoderViT)) for module in snapper.modules())
    entry = first_entry(namespace)
    snapped = snap_boxes(snapper, namespace, entry, some_boxes(entry), CPU)
    assert snapped.boxes.shape == (2, 4) and snapped.masks is None


# -- weights and their fingerprint --------------------------------------------------------------------
def one_line_error(error: pytest.ExceptionInfo[RefineError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_weights_of_another_encoder_are_refused_naming_both_fingerprints(base_dataset: dict, tmp_path: Path) -> None:
    namespace = tiny_namespace(base_dataset)
    other_weights = tmp_path / "sam_hq_vit_tiny.pth"
    torch.save(build_seeded_sam("vit_tiny", seed=7).state_dict(), other_weights)
    for checkpoint, model_type, seed in [(None, "vit_b", 0), (None, "vit_tiny", 1), (other_weights, None, 0)]:
        with pytest.raises(RefineError) as error:
            build_snapper(namespace, checkpoint, model_type=model_type, seed=seed)
        message = one_line_error(error)
        identity = identity_for(model_type or "vit_tiny", checkpoint, seed)
        assert identity.fingerprint in message and namespace.fingerprint in message


def test_a_checkpoint_loads_its_own_decoder_weights(tmp_path: Path) -> None:
    checkpoint = tmp_path / "sam_hq_vit_tiny.pth"
    weights = build_seeded_sam("vit_tiny", seed=7).state_dict()
    torch.save({"model": weights}, checkpoint)  # a wrapped state dict, as training scripts save them
    store = FeatureStore(tmp_path / "features.zarr", create=True)
    namespace = Namespace.ensure(store, identity_for("vit_tiny", checkpoint).provenance())
    snapper = build_snapper(namespace, checkpoint)
    loaded = snapper.state_dict()
    assert loaded and all(torch.equal(value, weights[key]) for key, value in loaded.items())
    random_init = build_seeded_sam("vit_tiny").state_dict()
    assert not torch.equal(loaded["mask_decoder.hf_token.weight"], random_init["mask_decoder.hf_token.weight"])


def test_a_damaged_or_partial_checkpoint_is_one_line_naming_the_file(base_dataset: dict, tmp_path: Path) -> None:
    namespace = tiny_namespace(base_dataset)
    weights = build_seeded_sam("vit_tiny").state_dict()
    whole = tmp_path / "whole.pth"
    torch.save(weights, whole)
    garbage, truncated, encoder_only = tmp_path / "garbage.pth", tmp_path / "truncated.pth", tmp_path / "encoder.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    torch.save({k: v for k, v in weights.items() if k.startswith("image_encoder.")}, encoder_only)
    store = FeatureStore(tmp_path / "features.zarr", create=True)
    for checkpoint in (garbage, truncated, encoder_only):
        # Each in a namespace of its own, so that only the file itself can be wrong.
        own = Namespace.ensure(store, identity_for("vit_tiny", checkpoint).provenance())
        with pytest.raises(RefineError) as error:
            build_snapper(own, checkpoint)
        assert one_line_error(error).startswith(f"{checkpoint}: ")
    with pytest.raises(RefineError) as error:
        build_snapper(namespace, garbage)  # read before the fingerprints are compared: the real fault first
    assert one_line_error(error).startswith(f"{garbage}: not a readable PyTorch state dict")


# -- empty masks, no boxes, RLE -----------------------------------------------------------------------
def test_an_empty_mask_keeps_the_coarse_box_clipped_and_flagged(base_dataset: dict) -> None:
    namespace = tiny_namespace(base_dataset)
    entry = first_entry(namespace)
    height, width = entry.original_size
    coarse = torch.tensor([[4.0, 5.0, 30.0, 40.0], [width - 10.0, 2.0, width + 20.0, 20.0]])  # the second crosses
    snapper = build_snapper(namespace)
    nothing = snap_boxes(snapper, namespace, entry, coarse, CPU, mask_threshold=1e9, return_masks=True)
    assert nothing.kept_coarse.all() and nothing.masks is not None and not nothing.masks.any()
    assert torch.equal(nothing.boxes, torch.tensor([[4.0, 5.0, 30.0, 40.0], [width - 10.0, 2.0, width, 20.0]]))
    assert ((nothing.scores >= 0) & (nothing.scores <= 1)).all()
    none = snap_boxes(snapper, namespace, entry, torch.zeros((0, 4)), CPU, return_masks=True)
    assert none.boxes.shape == (0, 4) and none.scores.shape == (0,) and none.kept_coarse.shape == (0,)
    assert none.masks is not None and none.masks.shape == (0, height, width)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode, numpy 2
def test_masks_round_trip_through_coco_rle() -> None:
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((3, 37, 53)) < 0.3)
    masks[1] = False
    masks[2, 10:20, 5:7] = True
    rles = masks_to_rle(masks)
    assert json.loads(json.dumps(rles)) == rles and all(isinstance(rle["counts"], str) for rle in rles)
    assert all(rle["size"] == [37, 53] for rle in rles)
    decoded = mask_utils.decode(rles)  # H x W x N
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())
    assert mask_utils.area(rles).tolist() == masks.flatten(1).sum(1).tolist()
    assert masks_to_rle(torch.zeros((0, 37, 53), dtype=torch.bool)) == []


def test_tight_boxes_follow_cocos_convention_for_pixel_masks() -> None:
    """A mask over columns 5..6 and rows 10..19 is COCO box [5, 10, 2, 10]: xyxy [5, 10, 7, 20]."""
    masks = torch.zeros((4, 37, 53), dtype=torch.bool)
    masks[0, 10:20, 5:7] = True
    masks[1, 0, 0] = True
    masks[2, 36, 52] = True
    masks[3, 3:30, 40:53] = True
    masks[3, 20, 8] = True
    assert tight_boxes(masks)[0].tolist() == [5.0, 10.0, 7.0, 20.0]
    assert torch.equal(tight_boxes(masks), coco_boxes(masks))
