"""The `refine` CLI itself: help without the heavy libraries, option choices that match the registries,
progress in a log (stderr not a terminal)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.hqsam.encoder import ENCODERS
from pipeline.model.registry import REFINERS
from stages import progress
from stages.options import ENCODER_NAMES, REFINER_NAMES, EncoderName, RefinerName

REPO = Path(__file__).resolve().parents[1]

# Build the help of every command and sub-command in a fresh interpreter; report what it imported.
HELP_OF_EVERY_COMMAND = """
import json, sys
from typer.main import get_command
from typer.testing import CliRunner
from stages.cli import app

def paths(command, path=()):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from paths(sub, (*path, name))

runner = CliRunner()
helped = []
for path in paths(get_command(app)):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output, (path, result.output)
    helped.append(" ".join(path))
print(json.dumps({"helped": helped, "modules": sorted({name.split(".")[0] for name in sys.modules})}))
"""


@pytest.fixture(scope="module")
def after_help() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", HELP_OF_EVERY_COMMAND], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_help_of_every_command_never_imports_torch(after_help: dict) -> None:
    assert {"extract", "train", "evaluate", "apply", "demo-data", "store", "store gc"} <= set(after_help["helped"])
    assert {"torch", "torchvision", "segment_anything_hq"} & set(after_help["modules"]) == set()


def test_help_of_every_command_never_imports_the_store_libraries(after_help: dict) -> None:
    assert {"zarr", "numpy", "fsspec"} & set(after_help["modules"]) == set()


def test_option_choices_are_the_registries_names() -> None:
    assert ENCODER_NAMES == tuple(ENCODERS)
    assert REFINER_NAMES == tuple(REFINERS)
    assert [choice.value for choice in EncoderName] == list(ENCODERS)
    assert [choice.value for choice in RefinerName] == list(REFINERS)


# -- progress without a terminal (the CliRunner's stderr is none) ------------------------------------------
def lines_starting(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def test_extract_prints_throttled_status_lines_to_a_log(cli, dataset, monkeypatch) -> None:
    args = ["extract", "--images", dataset["images"], "--annotations", dataset["annotations"]]
    args += ["--store", dataset["store"], "--batch-size", 1, "--workers", 0]  # a warm re-run: 4 batches of hits
    monkeypatch.setattr(progress, "STATUS_INTERVAL_S", 0.0)
    every = cli(*args)
    assert every.exit_code == 0, every.output
    lines = lines_starting(every.stderr, "extract ")
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert re.fullmatch(r"extract 4/4 images, \d+\.\d\d img/s, 4 hits, 0 computed, 0 failed, ETA 0:00:00", lines[-1])
    assert "━" not in every.stderr  # no rich bar drawn at the end
    assert "4 hits, 0 computed" in every.stdout  # the summary as before

    monkeypatch.setattr(progress, "STATUS_INTERVAL_S", 3600.0)
    throttled = cli(*args)
    assert throttled.exit_code == 0, throttled.output
    assert [line.split()[1] for line in lines_starting(throttled.stderr, "extract ")] == ["1/4"]  # the first only


def test_train_prints_throttled_status_lines_to_a_log(cli, base_dataset, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(progress, "STATUS_INTERVAL_S", 0.0)
    result = cli(
        "train",
        "--store",
        base_dataset["store"],
        "--annotations",
        base_dataset["annotations"],
        "--out",
        tmp_path / "out",
        *("--epochs", 2, "--batch-size", 2, "--jitters", 1),  # 4 images: 2 steps per epoch
    )
    assert result.exit_code == 0, result.output
    steps = lines_starting(result.stderr, "epoch ")
    train = [line for line in steps if " step " in line]
    assert [line.split(",")[0] for line in train] == [
        "epoch 1/2 step 1/2",
        "epoch 1/2 step 2/2",
        "epoch 2/2 step 1/2",
        "epoch 2/2 step 2/2",
    ]
    fields = r", loss \d+\.\d{4}, \d+\.\d boxes/s, data wait \d+%, ETA "
    assert re.fullmatch(r"epoch 1/2 step 1/2" + fields + r"\?", train[0])  # no rate yet at the first step
    assert re.fullmatch(r"epoch 1/2 step 2/2" + fields + r"\d+:\d\d:\d\d", train[1])
    assert re.fullmatch(r"epoch 2/2 step 2/2" + fields + "0:00:00", train[-1])
    assert {line.split(" validate")[0] for line in steps if " validate " in line} == {"epoch 1/2", "epoch 2/2"}
    assert "━" not in result.stderr
    assert "train loss" in result.stdout
