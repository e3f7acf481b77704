"""Data flows one way: inference (`apply`, `evaluate`, `review`, snap) loads no extraction and no training code."""

from __future__ import annotations

import json
import re
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
    "pipeline.store.writer",
    "segment_anything_hq",
}
# Snap runs HQ-SAM's own prompt encoder and mask decoder with the weights that made the features.
SNAP_NEEDS = {"pipeline.encoder", "segment_anything_hq"}


def loaded_modules(code: str, *args: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (which prints nothing), packages of the
    HQ-SAM package counted as the package."""
    code = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, check=True)
    return {name.split(".")[0] if name.startswith("segment") else name for name in json.loads(run.stdout)}


def test_inference_loads_no_training_or_extraction_code() -> None:
    loaded = loaded_modules(
        "import pipeline.apply, pipeline.evaluate, pipeline.review_run, stages.apply, stages.evaluate, stages.review"
    )
    assert "pipeline.apply" in loaded and "pipeline.checkpoints" in loaded
    assert sorted(TRAINING_OR_EXTRACTION & loaded) == []


def test_snap_loads_no_training_or_extraction_code(base_dataset: dict) -> None:
    """Building a snapper and snapping a box, not only importing: the package is imported when building."""
    code = (
        "import torch\n"
        "from pipeline.apply import image_entries\n"
        "from pipeline.snap import build_snapper, snap_boxes\n"
        "from pipeline.store import FeatureStore, Namespace\n"
        "store = FeatureStore(sys.argv[1])\n"
        "namespace = Namespace.open(store, store.fingerprints()[0])\n"
        "entries = image_entries(namespace, None)\n"
        "entry = entries[next(iter(entries))][1]\n"
        "box = torch.tensor([[1.0, 1.0, 20.0, 20.0]])\n"
        "snap_boxes(build_snapper(namespace), namespace, entry, box, torch.device('cpu'))"
    )
    loaded = loaded_modules(code, str(base_dataset["store"]))
    assert "pipeline.snap" in loaded and SNAP_NEEDS <= loaded
    assert sorted((TRAINING_OR_EXTRACTION - SNAP_NEEDS) & loaded) == []


def test_tests_and_benchmarks_import_no_test_module() -> None:
    """Shared test code lives in helper modules (tests/helpers.py, tests/fuzzing.py) and fixtures in
    conftest.py; a benchmark runs from the installed package without editing sys.path."""
    test_imports = [
        f"{path.name}: {line.strip()}"
        for path in sorted((REPO / "tests").glob("*.py"))
        for line in path.read_text().splitlines()
        if re.match(r"\s*(from|import) tests\.(test_\w+|conftest)\b", line)
    ]
    path_edits = [path.name for path in sorted((REPO / "bench").glob("*.py")) if "sys.path" in path.read_text()]
    assert test_imports == [] and path_edits == []
