"""Fuzzing the values `params.yaml` sends through dvc.yaml into each stage's options: whatever a value is,
the command ends with a usage error naming the option (exit 2) or reaches the stage (here: exit 1 with one
line, since every path points at nothing), never a traceback.

Which option each parameter reaches is read from dvc.yaml itself, so a new parameter is fuzzed as soon as a
stage uses it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import FUZZ_SLOW

ROOT = Path(__file__).parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
# Options whose value is a path or URL: any string is one, and a URL would reach for the network.
PATHS = {"--store"}


def _options_from_params() -> list[tuple[str, str, str]]:
    """(command, option, parameter) for each `--option ${section.key}` in dvc.yaml's commands."""
    pairs = []
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        command = " ".join((stage.get("do") or stage)["cmd"].split())
        name = command.split()[1]
        for option, parameter in re.findall(r"(--[\w-]+) \$\{(\w+\.\w+)\}", command):
            if option not in PATHS:
                pairs.append((name, option, parameter))
    return pairs


OPTIONS = _options_from_params()


def _parameter(name: str) -> object:
    section, key = name.split(".")
    return PARAMS[section][key]


@pytest.fixture
def failing_fast(tmp_path: Path) -> dict[str, list[str]]:
    """The arguments of each command that make it stop at its first file, after its options are read."""
    (tmp_path / "a-file").write_text("")
    nothing = tmp_path / "nothing"
    return {
        "demo-data": ["--out", str(tmp_path / "a-file" / "demo")],
        "extract": ["--images", str(nothing), "--annotations", f"{nothing}.json", "--store", str(nothing)],
        "train": ["--store", str(nothing), "--annotations", f"{nothing}.json"],
        "evaluate": ["--store", str(nothing), "--annotations", f"{nothing}.json", "--model", f"{nothing}.pt"],
    }


def assert_usage_error_or_one_line(result, option: str) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (1, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert f"'{option}'" in result.stderr, result.stderr  # click names the option it refused
    else:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr


values = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "1e999", "-0", "", "0x10", "1_000", "true", "null", "-1", "4294967296"]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=12),
)


def test_dvc_yaml_sends_parameters_to_options() -> None:
    assert {option for _, option, _ in OPTIONS} >= {"--epochs", "--lr", "--seed", "--encoder", "--methods"}


@pytest.mark.parametrize(("command", "option", "parameter"), OPTIONS, ids=[f"{c}{o}" for c, o, _ in OPTIONS])
def test_the_value_params_yaml_has_now_is_accepted(cli, failing_fast, command: str, option: str, parameter: str):
    result = cli(command, *failing_fast[command], option, str(_parameter(parameter)))
    assert result.exit_code == 1, result.output  # past the options, stopped at the first missing file


@pytest.mark.parametrize(("command", "option", "parameter"), OPTIONS, ids=[f"{c}{o}" for c, o, _ in OPTIONS])
@FUZZ_SLOW
@given(value=values)
def test_any_parameter_value_is_a_usage_error_or_reaches_the_stage(
    cli, failing_fast, command: str, option: str, parameter: str, value: str
) -> None:
    assert_usage_error_or_one_line(cli(command, *failing_fast[command], option, value), option)


FLOATS = [(c, o, p) for c, o, p in OPTIONS if isinstance(_parameter(p), float)]
SEEDS = [(c, o, p) for c, o, p in OPTIONS if o == "--seed"]


@pytest.mark.parametrize(("command", "option", "parameter"), FLOATS, ids=[f"{c}{o}" for c, o, _ in FLOATS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_parameter_must_be_finite(cli, failing_fast, command: str, option: str, parameter: str, value: str):
    result = cli(command, *failing_fast[command], option, value)
    assert result.exit_code == 2 and f"'{option}'" in result.stderr, result.output


@pytest.mark.parametrize(("command", "option", "parameter"), SEEDS, ids=[f"{c}{o}" for c, o, _ in SEEDS])
@pytest.mark.parametrize("value", ["-1", str(2**32), str(2**64)])
def test_a_seed_is_a_32_bit_word(cli, failing_fast, command: str, option: str, parameter: str, value: str):
    """Seeds are mixed as 32-bit words: 2**32 would silently repeat seed 0, 2**64 overflowed torch."""
    result = cli(command, *failing_fast[command], option, value)
    assert result.exit_code == 2 and f"'{option}'" in result.stderr, result.output
