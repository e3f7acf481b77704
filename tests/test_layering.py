"""Data flows one way: inference (`apply`, `evaluate`, `review`, snap) loads no extraction and no training code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The training and extraction wings (their packages included), HQ-SAM, and the store's writer.
TRAINING_OR_EXTRACTION = {
    "pipeline.training",
    "pipeline.training.train",
    "pipeline.training.engine",
    "pipeline.training.loss",
    "pipeline.training.sampler",
    "pipeline.training.config",
    "pipeline.extraction",
    "pipeline.extraction.extract",
    "pipeline.extraction.encoder_runner",
    "pipeline.extraction.image_files",
    "pipeline.extraction.writers",
    "pipeline.hqsam.encoder",
    "pipeline.hqsam.attention",
    "pipeline.store.writer",
    "segment_anything_hq",
}
# Snap runs HQ-SAM's own prompt encoder and mask decoder with the weights that made the features.
SNAP_NEEDS = {"pipeline.hqsam.encoder", "segment_anything_hq"}


def loaded_modules(code: str, *args: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (which prints nothing), packages of the
    HQ-SAM package counted as the package."""
    code = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, check=True)
    return {name.split(".")[0] if name.startswith("segment") else name for name in json.loads(run.stdout)}


def test_inference_loads_no_training_or_extraction_code() -> None:
    loaded = loaded_modules(
        "import pipeline.inference.apply, pipeline.inference.evaluate, pipeline.inference.review_run\n"
        "import stages.apply, stages.evaluate, stages.review"
    )
    assert "pipeline.inference.apply" in loaded and "pipeline.model.checkpoints" in loaded
    assert sorted(TRAINING_OR_EXTRACTION & loaded) == []


def test_snap_loads_no_training_or_extraction_code(base_dataset: dict) -> None:
    """Building a snapper and snapping a box, not only importing: the package is imported when building."""
    code = (
        "import torch\n"
        "from pipeline.inference.apply import image_entries\n"
        "from pipeline.inference.snap import snap_boxes\n"
        "from pipeline.inference.snapper import build_snapper\n"
        "from pipeline.store import FeatureStore, Namespace\n"
        "store = FeatureStore(sys.argv[1])\n"
        "namespace = Namespace.open(store, store.fingerprints()[0])\n"
        "entries = image_entries(namespace, None)\n"
        "entry = entries[next(iter(entries))][1]\n"
        "box = torch.tensor([[1.0, 1.0, 20.0, 20.0]])\n"
        "snap_boxes(build_snapper(namespace), namespace, entry, box, torch.device('cpu'))"
    )
    loaded = loaded_modules(code, str(base_dataset["store"]))
    assert "pipeline.inference.snap" in loaded and SNAP_NEEDS <= loaded
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


def test_library_modules_and_functions_stay_small() -> None:
    """One concept a module: at most 300 lines (the demo generator aside) and no function over 60."""
    import ast

    too_long = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(REPO).as_posix()
        if text.count("\n") > 300 and name != "pipeline/demo_data.py":
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
