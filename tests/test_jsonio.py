"""The atomic JSON writer: the old file or the new one, never a temporary left behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.errors import RefineError
from pipeline.jsonio import remove_leftovers, replace_atomically, write_json


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out" / "metrics.json"
    write_json(target, {"b": 1, "a": [1.5]}, sort_keys=True)
    write_json(target, {"b": 2, "a": [2.5]}, sort_keys=True)
    assert target.read_text() == json.dumps({"a": [2.5], "b": 2}, indent=1, sort_keys=True) + "\n"
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_a_failed_write_keeps_the_earlier_file_and_names_it(tmp_path: Path) -> None:
    target = tmp_path / "boxes.json"
    write_json(target, [1])
    with pytest.raises(ValueError):  # not JSON: nothing is written
        write_json(target, [float("nan")], allow_nan=False)
    (tmp_path / "blocked").write_text("a file where a folder should be")
    with pytest.raises(RefineError, match=r"blocked/x\.json: cannot write the manifest \("):
        write_json(tmp_path / "blocked" / "x.json", {}, what="the manifest")
    assert target.read_text() == "[\n 1\n]\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "boxes.json"]


def test_a_write_removes_what_killed_writers_left_and_never_a_live_writers_temporary(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])  # once it has ended, its process id stands for a killed writer
    dead.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        target = tmp_path / "metrics.json"
        left = tmp_path / f".metrics.json.{dead.pid}-0a1b.partial"
        older = tmp_path / ".metrics.json.0a1b2c3d4e5f.partial"  # named before temporaries carried a pid
        folder = tmp_path / f".metrics.json.{dead.pid}-9f9f.partial"
        writing = tmp_path / f".metrics.json.{live.pid}-2c2c.partial"
        other = tmp_path / f".other.json.{dead.pid}-3d3d.partial"
        for path in (left, older, writing, other):
            path.write_text("{")
        folder.mkdir()
        (folder / "crop.png").write_bytes(b"x")
        write_json(target, [1])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metrics.json", writing.name, other.name])
        assert remove_leftovers(target) == []  # the live writer's temporary stays
    finally:
        live.kill()
        live.wait()


def test_an_exclusive_write_creates_once_and_keeps_the_first(tmp_path: Path) -> None:
    target = tmp_path / "commit.json"
    assert replace_atomically(target, tmp_path / "a.partial", b"first", exclusive=True)
    assert not replace_atomically(target, tmp_path / "b.partial", b"second", exclusive=True)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["commit.json"]


def test_every_file_write_that_must_survive_a_crash_goes_through_the_one_writer() -> None:
    """Only pipeline/jsonio.py flushes files to disk; the review page swaps whole folders by rename."""
    repo = Path(__file__).resolve().parents[1]
    flushing = sorted(p.name for p in (repo / "pipeline").rglob("*.py") if "os.fsync(" in p.read_text())
    assert flushing == ["jsonio.py"]
