"""Fuzzing the readers of outside PyTorch files: whatever the bytes, one RefineError line naming the file.

Random bytes made torch's weights-only unpickler raise IndexError ("pop from empty list") about one time in
ten, which a list of exception types let through as a traceback.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.model.checkpoints import Checkpoint
from pipeline.hqsam.encoder import read_state_dict
from pipeline.errors import RefineError
from tests.fuzzing import FUZZ, assert_one_line_naming, flipped, truncated


def saved_state_dict() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.arange(6.0).view(2, 3), "bias": torch.zeros(2)}, buffer)
    return buffer.getvalue()


VALID = saved_state_dict()
READERS = [read_state_dict, Checkpoint.load]


def read_fails_cleanly(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzzed.pt"
    path.write_bytes(data)
    for reader in READERS:
        with pytest.raises(RefineError) as caught:
            reader(path)
        assert_one_line_naming(caught.value, path)


@FUZZ
@given(data=st.binary(max_size=512))
@example(data=b"\x80\x02.")  # a pickle that pops from an empty stack: IndexError inside torch.load
@example(data=b"")
def test_random_bytes_are_refused_in_one_line(tmp_path: Path, data: bytes) -> None:
    read_fails_cleanly(tmp_path, data)


@FUZZ
@given(data=truncated(VALID))
def test_a_truncated_file_is_refused_in_one_line(tmp_path: Path, data: bytes) -> None:
    read_fails_cleanly(tmp_path, data)


@FUZZ
@given(data=flipped(VALID))
def test_a_flipped_byte_is_read_or_refused_in_one_line(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "flipped.pt"
    path.write_bytes(data)
    try:
        state = read_state_dict(path)
    except RefineError as error:
        assert_one_line_naming(error, path)
    else:  # a flip inside the tensor bytes or an unchecked field: still a state dict of tensors
        assert all(isinstance(value, torch.Tensor) for value in state.values())
    with pytest.raises(RefineError):  # never a refiner checkpoint, whatever survives the flip
        Checkpoint.load(path)
