"""The limits-file corpus (tests/fixtures/limits, README there) and generated hostile files:
every good file loads, every bad one is refused with the named problem at its key path and
line; nothing raises anything but LimitsError, nothing hangs, no message is unbounded; and
`ds01hub check-config` says the same (file:line, key path, exit 1, --json)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from ds01hub.cli.admin import main as ds01hub_main
from ds01hub.limits import LimitsError, load_limits

CORPUS = Path(__file__).parent / "fixtures" / "limits"
GOOD = sorted((CORPUS / "good").glob("*.yaml"))
BAD = sorted((CORPUS / "bad").glob("*.yaml"))
MAX_PROBLEM_TEXT = 1000  # characters of one problem as printed (file path included)


def expectation(path: Path) -> tuple[str, str, int | None]:
    """(code, key path, line) from the file's first line: `# expect: CODE PATH LINE`."""
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    code, key_path, line = re.fullmatch(r"# expect: (\S+) (\S+) (\S+)", first.strip()).groups()
    return code, "" if key_path == "-" else key_path, None if line == "-" else int(line)


def refused(path: Path) -> LimitsError:
    with pytest.raises(LimitsError) as caught:
        load_limits(path)
    return caught.value


def assert_bounded(error: LimitsError) -> None:
    """No unbounded value anywhere: each problem, and the whole message, stay short."""
    for problem in error.problems:
        assert len(str(problem)) < MAX_PROBLEM_TEXT, str(problem)[:300]
    assert len(str(error)) < 25 * MAX_PROBLEM_TEXT


def test_the_corpus_is_there():
    assert len(GOOD) >= 10 and len(BAD) >= 50


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_a_good_file_loads(path):
    config = load_limits(path)
    config.resolve("anyone")
    header = path.read_bytes().decode("utf-8-sig").split("\n", 1)[0]
    if header.startswith("# warns: "):
        wanted = header.removeprefix("# warns: ").strip()
        assert any(wanted in warning for warning in config.warnings), config.warnings


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_a_bad_file_is_refused_with_its_named_problem_key_path_and_line(path):
    code, key_path, line = expectation(path)
    error = refused(path)
    found = [(p.code, p.key_path, p.line) for p in error.problems]
    assert (code, key_path, line) in found, found
    for problem in error.problems:
        assert problem.file == str(path)
        assert problem.fix
    assert_bounded(error)


# -- generated files: too big or not text to keep in the corpus ---------------------------------


def nested_brackets(depth: int) -> bytes:
    return b"defaults:\n  memory: " + b"[" * depth + b"]" * depth + b"\n"


def nested_blocks(depth: int) -> bytes:
    return b"".join(b"  " * i + b"k%d:\n" % i for i in range(depth)) + b"  " * depth + b"x\n"


def five_megabytes() -> bytes:
    line = b"  - user%07d\n"
    return b"groups:\n  all:\n    members:\n" + b"".join(line % i for i in range(360_000))


def bomb(levels: int, width: int) -> bytes:
    """Billion laughs: each level an anchor of `width` aliases of the previous one."""
    lines = [b"l0: &l0 [" + b", ".join([b"lol"] * width) + b"]"]
    for level in range(1, levels):
        refs = b", ".join([b"*l%d" % (level - 1)] * width)
        lines.append(b"l%d: &l%d [%s]" % (level, level, refs))
    lines.append(b"defaults: {memory: *l%d}" % (levels - 1))
    return b"\n".join(lines) + b"\n"


GENERATED: dict[str, tuple[Callable[[], bytes], str, int | None]] = {
    "utf-16": (lambda: "defaults:\n  memory: 8g\n".encode("utf-16"), "encoding", 1),
    "utf-16-without-bom": (lambda: "defaults: {}\n".encode("utf-16-le"), "encoding", 1),
    "utf-32": (lambda: "defaults: {}\n".encode("utf-32"), "encoding", 1),
    "latin-1-on-line-3": (lambda: "a: 1\nb: 2\nc: caf\xe9\n".encode("latin-1"), "encoding", 3),
    "20000-nested-brackets": (lambda: nested_brackets(20_000), "too-deep", 2),
    "100-nested-blocks": (lambda: nested_blocks(100), "too-deep", 33),
    "5-megabytes": (five_megabytes, "too-large", None),
    "billion-laughs": (lambda: bomb(9, 10), "alias-expansion", 5),
    "a-megabyte-number": (
        lambda: b"defaults: {max_gpus: 1" + b"0" * 1_000_000 + b"}\n",
        "number-too-long",
        1,
    ),
    "control-characters": (lambda: b"defaults: {memory: 8g\x07}\n", "yaml-syntax", 1),
    "binary": (lambda: bytes(range(256)) * 4, "encoding", 1),
}


@pytest.mark.parametrize("name", GENERATED)
def test_a_generated_hostile_file_is_refused_quickly_with_a_named_problem(name, tmp_path):
    make, code, line = GENERATED[name]
    path = tmp_path / "limits.yaml"
    path.write_bytes(make())
    error = refused(path)
    assert (code, line) in [(p.code, p.line) for p in error.problems], error.problems
    assert_bounded(error)


def test_a_huge_value_is_shown_cut_short(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text("defaults:\n  memory: '" + "x" * 900_000 + "'\n")
    (problem,) = refused(path).problems
    assert (problem.key_path, problem.line, problem.code) == ("defaults.memory", 2, "wrong-type")
    assert len(problem.value) <= 80 and "..." in problem.value


def test_a_hundred_thousand_problems_are_listed_up_to_a_bound(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text("groups:\n  g:\n    members: [" + ", ".join(["~"] * 50_000) + "]\n")
    error = refused(path)
    assert len(error.problems) == 101
    assert error.problems[-1].code == "too-many-problems"
    assert "49900 more problems" in error.problems[-1].message
    assert_bounded(error)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_not_a_regular_file_is_refused_without_blocking(kind, tmp_path):
    import os

    path = tmp_path / "limits.yaml"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    (problem,) = refused(path).problems
    assert problem.code in {"not-a-file", "unreadable"}


def test_an_unexpected_exception_becomes_an_internal_error_problem(tmp_path, monkeypatch):
    from ds01hub import limits

    path = tmp_path / "limits.yaml"
    path.write_text("defaults: {memory: 8g}\n")

    def broken(*args, **kwargs):
        raise RuntimeError("x" * 10_000)

    monkeypatch.setattr(limits, "_read_groups", broken)
    (problem,) = refused(path).problems
    assert problem.code == "internal-error" and problem.file == str(path)
    assert "RuntimeError" in problem.message and len(problem.message) < 250


# -- the same through `ds01hub check-config` ---------------------------------------------------


@pytest.mark.parametrize("path", BAD[::3], ids=lambda p: p.name)
def test_check_config_prints_file_line_key_path_and_fix_and_exits_1(path, capsys):
    code, key_path, line = expectation(path)
    assert ds01hub_main(["check-config", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("INVALID ")
    where = f"{path}:{line}: " if line else f"{path}: "
    assert any(
        row.startswith(f"  - {where}{key_path + ': ' if key_path else ''}") and "Fix: " in row
        for row in out.splitlines()
    ), out
    assert all(len(row) < MAX_PROBLEM_TEXT for row in out.splitlines())
    assert ds01hub_main(["check-config", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False and report["file"] == str(path)
    assert {"code": code, "key_path": key_path, "line": line}.items() <= next(
        p for p in report["problems"] if p["code"] == code
    ).items()


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_check_config_accepts_every_good_file(path, capsys):
    assert ds01hub_main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out.startswith("OK ")
