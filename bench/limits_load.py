"""Limits-file benchmark: what reading and checking a file costs, for real and hostile files.

    .venv/bin/python bench/limits_load.py [--repeat 5]

Each file is loaded `--repeat` times with `load_limits` in a fresh subprocess (so the peak RSS
is that file's); rows: the shipped example, the largest file accepted (1 MiB, 65,000 members),
and the hostile ones the hub must refuse quickly (a 5 MB file, a billion-laughs alias bomb,
20,000 nested brackets, a 1 MB number). Time is the median wall time of one load; memory is
the subprocess's peak RSS (ru_maxrss) minus the interpreter's own after importing ds01hub.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys, time
from ds01hub.limits import LimitsError, load_limits
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times, outcome = [], ""
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    try:
        load_limits(sys.argv[1])
        outcome = "loaded"
    except LimitsError as error:
        outcome = error.problems[0].code
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"times": times, "outcome": outcome, "kib": peak - base}))
"""


def member_list(count: int) -> bytes:
    return b"groups:\n  all:\n    members:\n" + b"".join(b"    - u%07d\n" % i for i in range(count))


def bomb() -> bytes:
    lines = [b"l0: &l0 [" + b", ".join([b"lol"] * 10) + b"]"]
    lines += [b"l%d: &l%d [%s]" % (i, i, b", ".join([b"*l%d" % (i - 1)] * 10)) for i in range(1, 9)]
    return b"\n".join(lines) + b"\ndefaults: {memory: *l8}\n"


FILES = {
    "shipped example (config/)": lambda: (REPO / "config" / "resource-limits.yaml").read_bytes(),
    "1 MiB, 65,000 members": lambda: member_list(65_000),
    "5 MB file": lambda: member_list(400_000),
    "billion laughs (10^9 values)": bomb,
    "20,000 nested brackets": lambda: b"defaults: {memory: " + b"[" * 20_000 + b"]" * 20_000 + b"}",
    "a 1 MB number": lambda: b"defaults: {max_gpus: 1" + b"0" * 1_000_000 + b"}\n",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print("| file | size | outcome | median load | peak memory |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        for name, make in FILES.items():
            path = Path(directory) / "limits.yaml"
            path.write_bytes(make())
            result = json.loads(
                subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), str(args.repeat)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            median_ms = statistics.median(result["times"]) * 1000
            print(
                f"| {name} | {path.stat().st_size / 1024:,.0f} KiB | {result['outcome']} | "
                f"{median_ms:,.1f} ms | +{result['kib'] / 1024:,.1f} MiB |"
            )


if __name__ == "__main__":
    main()
