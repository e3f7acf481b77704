"""`refine extract`: encode a dataset's images once into the content-addressed feature store."""

from __future__ import annotations

from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn

from pipeline.errors import RefineError
from stages.common import console, domain_errors, err_console
from stages.options import MAX_SEED, Device, EncoderName
from stages.progress import PhaseProgress, eta

if TYPE_CHECKING:
    from pipeline.extraction.config import ExtractSummary

# Under torchrun the ranks wait for each other once, at the end, for the slowest share: after a rank died
# and the run was re-launched, one rank may have hours of work left while the others only hash.
RANK_WAIT = timedelta(days=1)


class EncoderAmp(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    off = "off"


def extract(
    images: Annotated[
        Path, typer.Option(help="Image directory (the root that annotation file names are relative to).")
    ],
    store: Annotated[str, typer.Option(help="Feature store: a local path or an fsspec URL (s3://..., memory://...).")],
    annotations: Annotated[
        Optional[Path],
        typer.Option(
            help="COCO JSON: extract exactly the images it lists. Without it: every image file under --images."
        ),
    ] = None,
    encoder: Annotated[EncoderName, typer.Option(help="HQ-SAM encoder variant.")] = EncoderName.vit_tiny,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option(help="HQ-SAM checkpoint (sam_hq_vit_*.pth). Without it: seeded random weights (loud warning)."),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Seed of the random weights when no --checkpoint is given.")
    ] = 0,
    device: Annotated[
        Device, typer.Option(help="Where the encoder runs; auto picks CUDA when available.")
    ] = Device.auto,
    amp: Annotated[
        EncoderAmp,
        typer.Option(
            help="Encoder precision: auto = bf16 where the device computes it natively (CUDA with bf16, a CPU with "
            "AVX512-BF16 or AMX; about 2x faster than fp32 there), else fp32; off = fp32. Features are the same "
            "within bf16 rounding either way; each segment records which."
        ),
    ] = EncoderAmp.auto,
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Images per encoder call and per store shard. Default: 4 on CPU; on CUDA the largest power of two "
            "up to 64 that fits the encoder in the free device memory.",
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(min=0, help="DataLoader workers decoding images. Default: CPU cores - 1, at most 8."),
    ] = None,
    dataset: Annotated[
        Optional[str],
        typer.Option(help="Dataset name in the store. Default: the annotation file's stem (or the folder name)."),
    ] = None,
    manifest: Annotated[
        Optional[Path], typer.Option(help="Also write the dataset manifest (keys, sizes, fingerprint) here, for DVC.")
    ] = None,
    fused_attention: Annotated[
        bool,
        typer.Option(
            help="Run the encoder's attention through fused SDPA kernels (same features within float rounding, "
            "much less memory). Off: the package's own attention."
        ),
    ] = True,
    compile_encoder: Annotated[
        bool,
        typer.Option("--compile/--no-compile", help="torch.compile the encoder: a slower start, faster batches."),
    ] = False,
    skip_bad_images: Annotated[
        bool,
        typer.Option(
            help="Unreadable images (corrupt, truncated, not an image) are left out of the manifest instead of "
            "failing the run. Either way they never get an entry and everything else is committed."
        ),
    ] = False,
    check_hits: Annotated[
        bool,
        typer.Option(
            help="Read back every stored entry the dataset uses and check its digest; a damaged one is "
            "recomputed. --no-check-hits makes a warm re-run hash-only (e.g. on a remote store)."
        ),
    ] = True,
) -> None:
    """Encode every image once with HQ-SAM into the feature store; a re-run only hashes.

    Stops before any work (exit 1) on: a missing image directory, malformed or invalid annotations
    (duplicate ids, boxes that are NaN, empty or outside the image), an image listed but missing, a bad
    checkpoint, a store of another format. Unreadable image files are reported at the end (exit 1) after
    everything else is committed, unless --skip-bad-images.

    Under torchrun every rank hashes every file and encodes the images whose content key falls in its
    share; the main rank writes the manifest once all ranks have committed (see README, Scale).
    """
    # The library loads here, not at start-up: it imports torch, and `refine --help` must answer at once.
    from pipeline import distributed
    from pipeline.extraction.config import ExtractConfig
    from pipeline.extraction.extract import run_extract

    config = ExtractConfig(
        images=images,
        store=store,
        encoder=encoder.value,
        annotations=annotations,
        checkpoint=checkpoint,
        seed=seed,
        device=device.value,
        amp=amp.value,
        batch_size=batch_size,
        workers=workers,
        dataset=dataset,
        manifest_out=manifest,
        skip_bad_images=skip_bad_images,
        fused_attention=fused_attention,
        compile=compile_encoder,
        check_hits=check_hits,
    )
    if checkpoint is None and distributed.is_main():
        err_console.print(
            f"[bold yellow]WARNING: no --checkpoint: {encoder.value} runs with RANDOM weights (seed {seed}). "
            "These features are not pretrained; fine for tests and the demo only. "
            "The store records this in its provenance.[/]",
            soft_wrap=True,
        )
    with domain_errors(), distributed.process_group("gloo", RANK_WAIT):  # objects only: gloo even on CUDA
        main = distributed.is_main()
        with ExtractProgress(enabled=main) as report:
            summary = run_extract(config, report)
        if not main:  # the main rank reports for all ranks; a failure fails every rank
            if summary.failed and not skip_bad_images:
                raise typer.Exit(code=1)
            return
        _print_summary(summary)
        for message in summary.repaired:
            err_console.print(f"  damaged, recomputed: {message}", markup=False, highlight=False)
        if summary.failed and not skip_bad_images:
            for message in summary.failed:
                err_console.print(f"  {message}", markup=False, highlight=False)
            raise RefineError(
                f"{len(summary.failed)} image(s) failed (listed above), so no dataset manifest was written; "
                "every other image is committed. Fix or remove them, or pass --skip-bad-images"
            )


class ExtractProgress(PhaseProgress):
    """Progress of each phase (extract, then repair of damaged entries), fed by `run_extract`'s callback."""

    def columns(self) -> tuple[ProgressColumn, ...]:
        return (
            TextColumn("{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "{task.fields[rate]:>7.2f} img/s  data wait {task.fields[wait]:>4.0%}  hits {task.fields[hits]}  "
                "computed {task.fields[computed]}  failed {task.fields[failed]}"
            ),
            TimeElapsedColumn(),
        )

    def report(self, phase: str, done: int, total: int, summary: ExtractSummary) -> None:
        elapsed = summary.wall_s
        self.update(
            phase,
            phase,
            total or None,
            done,
            rate=done / elapsed if elapsed > 0 else 0.0,
            wait=summary.data_wait_s / elapsed if elapsed > 0 else 0.0,  # share of the time spent waiting for images
            hits=summary.hits,
            computed=summary.computed,
            failed=len(summary.failed),
        )

    def status_line(self, phase: str, done: int, total: int, summary: ExtractSummary) -> None:
        elapsed = summary.wall_s
        self.status(
            f"{phase} {done}/{total} images, {done / elapsed if elapsed > 0 else 0.0:.2f} img/s, "
            f"{summary.hits} hits, {summary.computed} computed, {len(summary.failed)} failed, "
            f"ETA {eta(total - done, done, elapsed)}"
        )


def _print_summary(summary: ExtractSummary) -> None:
    rate = summary.computed / summary.encoder_s if summary.encoder_s else 0.0
    console.print(
        f"dataset {summary.dataset}: {summary.images} images ({summary.unique} unique), "
        f"{summary.hits} hits, {summary.computed} computed, {len(summary.failed)} failed, "
        + (f"{len(summary.repaired)} damaged (recomputed), " if summary.repaired else "")
        + (
            f"{summary.planes_added} entr(ies) recomputed to add their stride-4 planes, "
            if summary.planes_added
            else ""
        )
        + f"{summary.wall_s:.1f} s wall, {summary.bytes_written / 2**20:.1f} MiB written"
        + (f", encoder {rate:.2f} img/s" if summary.computed else ""),
        markup=False,
        highlight=False,
    )
    console.print(f"namespace {summary.fingerprint}: {summary.weights}", markup=False, highlight=False)
