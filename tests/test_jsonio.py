"""The atomic JSON writer: the old file or the new one, never a temporary left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import RefineError
from pipeline.jsonio import write_json


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
