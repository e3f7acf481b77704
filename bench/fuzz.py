"""The fuzz properties of the test suite, run for longer: how many inputs each reader took and what it found.

    python bench/fuzz.py [--examples 2000] [--out bench/results]

Runs tests/test_fuzz_readers.py, tests/test_fuzz_params.py and tests/test_torch_files.py under pytest with
REFINE_FUZZ_EXAMPLES=<examples> (CI runs them with 200; the properties that run a whole command per input
with a tenth of that) and hypothesis's statistics, and writes per property: the inputs it ran (passing,
failing, invalid), its seconds, and the failing input hypothesis shrank to, if any. Writes
`<out>/fuzz.json`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from results_file import write_and_show  # bench/, next to this script

ROOT = Path(__file__).resolve().parents[1]
SUITES = ["tests/test_fuzz_readers.py", "tests/test_fuzz_params.py", "tests/test_torch_files.py"]
COUNTS = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid")
PHASE = re.compile(r"during (\w+) phase \(([\d.]+) seconds\)")


def statistics(output: str) -> dict[str, dict]:
    """Hypothesis's statistics block per property -> inputs and seconds by phase."""
    found: dict[str, dict] = {}
    block = output.split("Hypothesis Statistics", 1)[-1]
    for chunk in re.split(r"\n(?=tests/\S+::\S+:\n)", block):
        name = re.match(r"\s*(tests/\S+::\S+):", chunk)
        if not name:
            continue
        figures = {"passing": 0, "failing": 0, "invalid": 0, "seconds": 0.0}
        for (_, seconds), counts in zip(PHASE.findall(chunk), COUNTS.findall(chunk), strict=True):
            passing, failing, invalid = (int(v) for v in counts)
            figures["passing"] += passing
            figures["failing"] += failing
            figures["invalid"] += invalid
            figures["seconds"] += float(seconds)
        found[name.group(1)] = figures
    return found


def falsified(output: str) -> list[str]:
    """The shrunk failing inputs pytest printed, one line each."""
    return [line.strip()[:300] for line in output.splitlines() if line.strip().startswith("Falsifying example")] + [
        line.strip()[:300] for line in output.splitlines() if re.match(r"^E\s+(data|value|annotations)=", line)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="Inputs per property (a tenth for the slow ones).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="Folder for fuzz.json.")
    args = parser.parse_args()
    environment = {**os.environ, "REFINE_FUZZ_EXAMPLES": str(args.examples)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics"]
    started = time.perf_counter()
    run = subprocess.run([*command, *SUITES], cwd=ROOT, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    output = run.stdout + run.stderr
    properties = statistics(output)
    summary = re.findall(r"(\d+ (?:passed|failed|error)[^\n]*) in ", output)
    write_and_show(
        args.out,
        "fuzz",
        {
            "examples_per_property": args.examples,
            "pytest": summary[-1] if summary else output[-500:],
            "exit_code": run.returncode,
            "seconds": round(seconds, 1),
            "inputs": sum(p["passing"] + p["failing"] + p["invalid"] for p in properties.values()),
            "failures_found": falsified(output),
            "properties": properties,
        },
    )


if __name__ == "__main__":
    main()
