"""What a second `make demo` / `make test` pays for the images, side by side.

    .venv/bin/python bench/images.py [--runs 3] [--full]

  reuse          ensure_images() when both tags exist: hash the inputs, `docker image inspect`
  source change  the single-user image after a change to the package source: only the last
                 layer (the project wheel) is rebuilt, the dependency layer comes from the cache
  full rebuild   (--full) the single-user image after a change that invalidates the dependency
                 layer (another CA bundle): pip installs everything again (network!)

The source change is made in a temporary copy of the checkout; every image the benchmark
builds is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ds01hub.host import bootstrap

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".venv", ".git", ".state", "build", "__pycache__", "*.pyc")


def timed(action: Callable[[], object], runs: int) -> list[float]:
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return seconds


def changed_source(directory: Path, run: int) -> Path:
    source = directory / f"src{run}"
    shutil.copytree(REPO, source, ignore=IGNORE)
    with (source / "ds01hub" / "units.py").open("a") as handle:
        handle.write(f"\n# bench/images.py change {run} {time.time()}\n")
    return source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also time a full rebuild")
    args = parser.parse_args()

    images = bootstrap.ensure_images()  # warm: both images exist before timing
    base = images["base"].tag
    built: list[str] = []
    rows: list[tuple[str, list[float]]] = []
    try:
        rows.append(("reuse", timed(bootstrap.ensure_images, args.runs)))
        with tempfile.TemporaryDirectory(prefix="ds01hub-bench-") as directory:
            sources = iter(changed_source(Path(directory), run) for run in range(args.runs))

            def rebuild_last_layer() -> None:
                result = bootstrap.ensure_singleuser_image(base, source=next(sources))
                assert result.built
                built.append(result.tag)

            rows.append(("source change", timed(rebuild_last_layer, args.runs)))
            if args.full:
                bundle = Path(directory) / "other-ca.pem"
                bundle.write_bytes(bootstrap.HOST_CA_BUNDLE.read_bytes() + b"\n")

                def rebuild_all() -> None:
                    result = bootstrap.ensure_singleuser_image(base, ca_bundle=bundle, source=REPO)
                    built.append(result.tag)

                rows.append(("full rebuild", timed(rebuild_all, 1)))
    finally:
        for tag in built:
            subprocess.run(["docker", "rmi", tag], capture_output=True)
        bootstrap.tag_alias(images["singleuser"].tag)  # :latest back where it was

    print(f"\n{'case':<16}{'runs':>6}{'median s':>11}{'min s':>9}{'max s':>9}")
    for name, seconds in rows:
        print(
            f"{name:<16}{len(seconds):>6}{statistics.median(seconds):>11.2f}"
            f"{min(seconds):>9.2f}{max(seconds):>9.2f}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
