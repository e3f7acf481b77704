"""Data flows one way: inference (`apply`, `evaluate`, `review`) loads no extraction and no training code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINING_OR_EXTRACTION = {
    "pipeline.train",
    "pipeline.engine",
    "pipeline.loss",
    "pipeline.sampler",
    "pipeline.config",
    "pipeline.extract",
    "pipeline.extract_encoder",
    "pipeline.extract_images",
    "pipeline.extract_writer",
    "pipeline.encoder",
    "pipeline.attention",
    "pipeline.store_writer",
    "segment_anything_hq",
}


def test_inference_loads_no_training_or_extraction_code() -> None:
    code = (
        "import json, sys; import pipeline.apply, pipeline.evaluate, pipeline.review_run, stages.apply, "
        "stages.evaluate, stages.review; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    )
    assert "pipeline.apply" in loaded and "pipeline.checkpoints" in loaded
    assert (
        sorted(TRAINING_OR_EXTRACTION & {name.split(".")[0] if name.startswith("segment") else name for name in loaded})
        == []
    )
