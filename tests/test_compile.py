"""`extract --compile`: the torch.compile'd encoder runs on CPU and stores the features of the eager one."""

from __future__ import annotations

import numpy as np

from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.extract import run_extract
from pipeline.store import FeatureStore, Namespace
from tests.helpers import write_coco


def test_compiled_extract_stores_the_eager_features(base_dataset, tmp_path):
    first = base_dataset["files"][:1]
    annotations = write_coco(tmp_path / "one.json", base_dataset["images"], first)
    # fp32 on both sides: under bf16 two kernel choices differ by bf16 rounding, which would hide a real mismatch.
    stores = {}
    for compiled in (False, True):
        stores[compiled] = tmp_path / f"compiled_{compiled}.zarr"
        config = ExtractConfig(
            images=base_dataset["images"],
            store=str(stores[compiled]),
            annotations=annotations,
            workers=0,
            batch_size=1,
            amp="off",
            compile=compiled,
        )
        summary = run_extract(config)
        assert summary.computed == 1 and not summary.failed

    eager = Namespace.open(FeatureStore(stores[False]), summary.fingerprint)  # the same namespace: same identity
    compiled = Namespace.open(FeatureStore(stores[True]), summary.fingerprint)
    ((key, entry),) = compiled.entries().items()
    for stored, expected in zip(compiled.read(entry), eager.read(eager.entries()[key]), strict=True):
        np.testing.assert_allclose(stored.astype(np.float32), expected.astype(np.float32), rtol=1e-2, atol=2e-3)
    # How the features were computed is recorded with the segment, not in the fingerprint.
    (segment,) = compiled.commit_names()
    recorded = compiled.read_commit(segment).computed_with
    assert recorded == {"device": "cpu", "autocast": "off", "fused_attention": True, "compiled": True}
