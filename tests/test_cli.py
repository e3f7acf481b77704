"""The `refine` CLI itself: its option choices match the library's registries."""

from __future__ import annotations

from pipeline.encoder import ENCODERS
from pipeline.refiner import REFINERS
from stages.options import ENCODER_NAMES, REFINER_NAMES, EncoderName, RefinerName


def test_option_choices_are_the_registries_names() -> None:
    assert ENCODER_NAMES == tuple(ENCODERS)
    assert REFINER_NAMES == tuple(REFINERS)
    assert [choice.value for choice in EncoderName] == list(ENCODERS)
    assert [choice.value for choice in RefinerName] == list(REFINERS)
