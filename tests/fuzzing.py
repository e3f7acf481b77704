"""What the fuzz tests share: how many examples, the strategies that damage a valid file, and the promise
every reader keeps (one RefineError line naming the file, or a correct read).

`REFINE_FUZZ_EXAMPLES` sets the examples per property (CI: the default); `bench/fuzz.py` runs the same
properties with many more.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pipeline.errors import RefineError

EXAMPLES = int(os.environ.get("REFINE_FUZZ_EXAMPLES", "200"))
# Fixtures are shared by a property's examples on purpose: each example restores what it damaged.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Properties that run a command or read a whole store per example get a tenth as many.
FUZZ_SLOW = settings(FUZZ, max_examples=max(EXAMPLES // 10, 5))


def assert_one_line_naming(error: RefineError, *names: object) -> None:
    """The promise of every reader: one line that names the file (and the entry where there is one)."""
    message = str(error)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)


def truncated(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(0, len(valid) - 1).map(lambda length: valid[:length])


def flipped(valid: bytes) -> st.SearchStrategy[bytes]:
    def flip(position_and_mask: tuple[int, int]) -> bytes:
        position, mask = position_and_mask
        data = bytearray(valid)
        data[position] ^= mask
        return bytes(data)

    return st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)).map(flip)


def damaged_bytes(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, `valid` cut short at any length, or `valid` with one byte changed."""
    return st.one_of(st.binary(max_size=2 * len(valid) + 8), truncated(valid), flipped(valid))


# JSON values that break naive readers: every type, NaN, infinities, huge and negative numbers.
odd_numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1.0, 0, 0.5, 2**63, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
)
junk = st.one_of(
    st.none(),
    st.booleans(),
    odd_numbers,
    st.text(max_size=6),
    st.lists(st.integers(-3, 3), max_size=4),
    st.just({}),
    st.just({"unexpected": 1}),
)


@st.composite
def reshaped(draw: st.DrawFn, value: Any) -> Any:
    """`value` (parsed JSON) with one place changed: a value replaced by junk (a list where an object is,
    a string where a number is, NaN, ...), a key dropped or added, a list item repeated or dropped."""
    places = list(_places(value, ()))
    path = draw(st.sampled_from(places))
    parent, key = _walk(value, path[:-1]), path[-1] if path else None
    action = draw(st.sampled_from(["replace", "drop", "add", "repeat"]))
    copy = json.loads(json.dumps(value))
    if not path:
        return draw(junk)
    target = _walk(copy, path[:-1])
    if action == "replace" or (action in ("drop", "repeat") and not isinstance(parent, (dict, list))):
        target[key] = draw(junk)
    elif action == "drop":
        del target[key]
    elif action == "add" and isinstance(target, dict):
        target[draw(st.sampled_from(["extra", "id", "version", "format", "layout"]))] = draw(junk)
    elif action == "repeat" and isinstance(target, list):
        target.insert(key, target[key])  # a duplicate id, a row committed twice
    else:
        target[key] = draw(junk)
    return copy


def _places(value: Any, path: tuple) -> Any:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _places(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:6]):  # long columns: their first items stand for the rest
            yield from _places(item, (*path, index))


def _walk(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def damaged_json(valid: Any) -> st.SearchStrategy[bytes]:
    """The bytes of `valid` damaged (see `damaged_bytes`) or `valid` reshaped, as JSON text (NaN and
    Infinity written as some tools write them)."""
    text = json.dumps(valid).encode()
    return st.one_of(damaged_bytes(text), reshaped(valid).map(lambda value: json.dumps(value).encode()))


def replace_bytes(path: Path, data: bytes) -> bytes:
    """Write `data` to `path` and return what was there (to put back after the example)."""
    before = path.read_bytes()
    path.write_bytes(data)
    return before
