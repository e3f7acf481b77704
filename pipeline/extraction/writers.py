"""`extract`'s output side: threads that commit encoded batches to the store behind the encoder."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

import torch

from pipeline.errors import RefineError
from pipeline.store.writer import SegmentWriter


def writer_threads(device: torch.device) -> int:
    """Threads committing batches: one keeps up with a CPU encoder; a GPU outruns one zarr write thread
    (about 600 MB/s of compressed shards on a 16-core host), so there it gets one per four cores, up to 4."""
    if device.type != "cuda":
        return 1
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class BackgroundWriter:
    """Commits batches on threads behind the encoder; the bounded queue keeps the encoder from running
    far ahead of the disk. Errors surface in the main thread at the next `put` or at `close`.

    Each thread owns a SegmentWriter, so each writes its own segment as independent writers do (the store
    never has two writers on one segment); several threads keep a fast GPU from waiting on one zarr write.
    """

    def __init__(self, make_writer: Callable[[], SegmentWriter], threads: int = 1) -> None:
        self.writers = [make_writer() for _ in range(threads)]
        self.queue: queue.Queue = queue.Queue(maxsize=threads + 1)
        self.error: BaseException | None = None
        self.threads = [
            threading.Thread(target=self._run, args=(writer,), name=f"refine-store-writer-{i}", daemon=True)
            for i, writer in enumerate(self.writers)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, writer: SegmentWriter) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                keys, embedding, early, original_sizes, resized_sizes, planes, ready = job
                try:
                    if ready is not None:
                        ready.synchronize()  # the device-to-host copies of this batch have landed
                    writer.write_batch(keys, embedding.numpy(), early.numpy(), original_sizes, resized_sizes, planes)
                except BaseException as error:  # handed to the main thread
                    self.error = error
            self.queue.task_done()

    def put(self, *job: object) -> None:
        self._raise_if_failed()
        self.queue.put(job)

    def flush(self) -> None:
        """Wait until every batch handed over so far is committed."""
        self.queue.join()
        self._raise_if_failed()

    def new_segment(self) -> None:
        """Commit what was handed over, then start fresh segments (named later than every existing one)."""
        self.flush()
        for writer in self.writers:
            writer.new_segment()

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is None:
            return
        error = self.error
        detail = str(error) if isinstance(error, RefineError) else f"{type(error).__name__}: {error}"
        raise RefineError(
            f"{self.writers[0].namespace.store.url}: writing features stopped ({detail}); every batch committed "
            "before is intact: fix the cause (e.g. free disk space), then run `refine extract` again to continue"
        )
