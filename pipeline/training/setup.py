"""What a `train` run trains with (`Training`), built by `prepare_training` from its `TrainConfig`: the
store's splits (training images, the ones held out to fit the score on, val), the refiner (or the one
resumed from a checkpoint), its optimizer, mixed precision and data loaders."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pipeline import distributed
from pipeline.boxes import HOLDOUT_STREAM, seeded_generator
from pipeline.devices import resolve_amp, resolve_device
from pipeline.errors import RefineError
from pipeline.splits import ImageBoxes, Split, load_split, require_planes, resolve_namespace
from pipeline.training.data import FeatureDataset, feature_loader, feature_statistics
from pipeline.model.base import Refiner, RefinerConfig
from pipeline.model.checkpoints import CHECKPOINT, Checkpoint
from pipeline.model.registry import build_refiner
from pipeline.store import FeatureStore, Namespace
from pipeline.training.config import TrainConfig
from pipeline.training.engine import CoarseBoxes, Precision, TrainForward
from pipeline.training.sampler import EpochShuffle


def cosine_schedule(base_lr: float, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero; a pure function of the step, so resuming needs no state."""

    def learning_rate(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return base_lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return learning_rate


def _workers(config: TrainConfig, device: torch.device) -> int:
    if config.workers is not None:
        return config.workers
    return 2 if device.type == "cuda" else 0


def hold_out(images: list[ImageBoxes], share: float, seed: int) -> tuple[list[ImageBoxes], list[ImageBoxes]]:
    """(images to train on, images held out to choose the abstention threshold on): `share` of them, at
    least one when share > 0, picked by a draw keyed by (seed, image id), so the order of the file does not matter."""
    if share <= 0:
        return images, []
    if len(images) < 2:
        raise RefineError(f"--holdout {share} needs at least 2 training images with boxes, got {len(images)}")
    draws = [torch.rand(1, generator=seeded_generator(seed, HOLDOUT_STREAM, image.image_id)).item() for image in images]
    count = min(len(images) - 1, max(1, round(share * len(images))))
    held = set(sorted(range(len(images)), key=draws.__getitem__)[:count])
    return [im for i, im in enumerate(images) if i not in held], [im for i, im in enumerate(images) if i in held]


@dataclass
class Training:
    """What a run trains with, built from its TrainConfig by `prepare_training`."""

    config: TrainConfig
    precision: Precision
    fingerprint: str
    encoder: dict[str, Any]  # model type and early channels, for the checkpoint
    train_split: Split
    val_split: Split
    train_boxes: CoarseBoxes
    val_boxes: CoarseBoxes  # of this rank's part of the validation images
    holdout_boxes: CoarseBoxes  # of this rank's part of the held-out training images
    held_out: int  # training images held out (over all ranks)
    model: Refiner
    step_model: torch.nn.Module  # returns every cascade stage's boxes (DDP-wrapped under torchrun)
    refiner_config: RefinerConfig
    optimizer: torch.optim.Optimizer
    sampler: EpochShuffle
    train_loader: DataLoader
    val_loader: DataLoader
    holdout_loader: DataLoader
    learning_rate: Callable[[int], float]
    start_epoch: int
    checkpoint: Checkpoint | None  # the one resumed from


@dataclass
class _Data:
    """A run's splits, read from the store: the images trained on and held out, and the val images."""

    store_url: str
    namespace: Namespace
    train_split: Split
    val_split: Split
    trained: list[ImageBoxes]
    held: list[ImageBoxes]


def _read_data(config: TrainConfig) -> _Data:
    """The run's namespace and splits, checked; the training images split into trained and held out."""
    if not 0.0 <= config.noise <= 0.5:
        raise RefineError(f"--noise must lie in [0, 0.5], got {config.noise}")
    store = FeatureStore(config.store)
    dataset = config.dataset or config.annotations.stem
    namespace = resolve_namespace(store, dataset, config.fingerprint)
    train_split = load_split(namespace, dataset, config.annotations, config.coarse)
    val_annotations = config.val_annotations or config.annotations
    val_dataset = config.val_dataset or (val_annotations.stem if config.val_annotations else dataset)
    val_split = load_split(namespace, val_dataset, val_annotations, config.val_coarse)
    if not 0.0 <= config.holdout < 1.0:
        raise RefineError(f"--holdout must lie in [0, 1), got {config.holdout}")
    trained, held = hold_out(train_split.images, config.holdout, config.seed)
    return _Data(store.url, namespace, train_split, val_split, trained, held)


def _start(
    config: TrainConfig, refiner_config: RefinerConfig, model: Refiner, train_data: FeatureDataset, fingerprint: str
) -> Checkpoint | None:
    """Resume the model from `<out>/model.pt` (with --resume; returns the checkpoint), else give it the
    training set's feature statistics."""
    main = distributed.is_main()
    path = config.out / CHECKPOINT
    # The main rank reads the checkpoint and hands it over: the other ranks' machines need no copy of <out>.
    checkpoint = distributed.broadcast(Checkpoint.load(path) if main else None) if config.resume else None
    if checkpoint is not None:
        checkpoint.check_resume(config.resolved(), refiner_config, fingerprint, path)
        model.load_state_dict(checkpoint.model)
    else:
        model.set_feature_statistics(distributed.broadcast(feature_statistics(train_data) if main else None))
    return checkpoint


def _optimise(
    config: TrainConfig, model: Refiner, device: torch.device, amp_dtype: torch.dtype | None, resumed: Checkpoint | None
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    """The model a step runs (DDP-wrapped under torchrun), its optimizer and the fp16 loss scaler."""
    model.to(device)  # before the optimizer: its state is created (or loaded) on the parameters' device
    step_model: torch.nn.Module = TrainForward(model)
    if distributed.world_size() > 1:
        # The refiner's buffers are fixed feature statistics: synced once when wrapped, never again per step.
        step_model = DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if resumed is not None:
        optimizer.load_state_dict(resumed.optimizer)
        if resumed.scaler is not None:
            scaler.load_state_dict(resumed.scaler)
    return step_model, optimizer, scaler


def prepare_training(
    config: TrainConfig, wrap_train_data: Callable[[FeatureDataset], FeatureDataset] | None = None
) -> Training:
    """Read the store's datasets, build (or resume) the refiner, its optimizer and its data loaders.

    `wrap_train_data` replaces the training loader's dataset by one with the same items made another way
    (bench/train.py: the encoder in the loop); the feature statistics still come from the store.
    """
    device = resolve_device(config.device)
    amp_dtype = resolve_amp(config.amp, device)
    data = _read_data(config)
    fingerprint = data.namespace.fingerprint
    torch.manual_seed(config.seed)
    refiner_config = config.refiner_config(int(data.namespace.provenance["early_channels"]))
    model = build_refiner(config.model, refiner_config)
    rank, world_size = distributed.rank(), distributed.world_size()
    planes = model.needs_plane
    if planes:
        require_planes(data.store_url, [data.train_split, data.val_split])
    val_images = data.val_split.images[rank::world_size]  # under torchrun: each rank validates its part
    held_part = data.held[rank::world_size]
    train_data, val_data, holdout_data = (
        FeatureDataset(data.store_url, fingerprint, images, planes) for images in (data.trained, val_images, held_part)
    )
    checkpoint = _start(config, refiner_config, model, train_data, fingerprint)
    step_model, optimizer, scaler = _optimise(config, model, device, amp_dtype, checkpoint)
    workers = _workers(config, device)
    sampler = EpochShuffle(len(train_data), config.seed, rank, world_size)
    rank_batch = math.ceil(config.batch_size / world_size)  # --batch-size is one step over all ranks
    loaded = wrap_train_data(train_data) if wrap_train_data is not None else train_data
    pin = device.type == "cuda"
    train_loader = feature_loader(loaded, rank_batch, workers, sampler, pin=pin)
    return Training(
        config=config,
        precision=Precision(device, amp_dtype, scaler),
        fingerprint=fingerprint,
        encoder={
            "model_type": data.namespace.provenance["model_type"],
            "early_channels": refiner_config.early_channels,
        },
        train_split=data.train_split,
        val_split=data.val_split,
        train_boxes=CoarseBoxes(data.trained, config.noise, config.seed, config.jitters),
        val_boxes=CoarseBoxes(val_images, config.noise, config.seed),
        holdout_boxes=CoarseBoxes(held_part, config.noise, config.seed, config.jitters),
        held_out=len(data.held),
        model=model,
        step_model=step_model,
        refiner_config=refiner_config,
        optimizer=optimizer,
        sampler=sampler,
        train_loader=train_loader,
        val_loader=feature_loader(val_data, rank_batch, workers, pin=pin),
        holdout_loader=feature_loader(holdout_data, rank_batch, workers, pin=pin),
        learning_rate=cosine_schedule(config.lr, config.warmup_steps, config.epochs * len(train_loader)),
        start_epoch=checkpoint.epoch if checkpoint is not None else 0,
        checkpoint=checkpoint,
    )
