"""Which images a classic (``DOCKER_BUILDKIT=0``) build would read, from its tar context.

Pure: bytes in, references out. The socket proxy must refuse ``FROM`` (and ``COPY --from``) of
images the caller may not use before the engine sees the build, and the classic builder gives
no other place to look than the Dockerfile inside the request body.

The engine will parse the same bytes with its own tar reader and Dockerfile parser, so this
module must never see a different Dockerfile or a different ``FROM`` than the engine does. It
therefore reads a strict subset and refuses (`ContextError`) whatever could be read two ways:

- the context: plain, gzip, bzip2 or xz tar (detected by the same magic bytes the engine uses);
  entries below a symbolic link of the archive, names that climb out with ``..``, and a
  Dockerfile that is not a regular file (or missing) are refused; the last entry of a path wins,
  as when the engine unpacks it. ``Dockerfile`` falls back to ``dockerfile`` as in the engine.
- the Dockerfile: UTF-8 only; no control characters or Unicode space other than tab, CR, LF;
  the ``escape`` parser directive only on the first line; ``FROM`` on one line, with no flags
  (``--platform`` could make the engine pull over a shared tag), ``image [AS name]``;
  ``$NAME`` / ``${NAME}`` of ARGs declared before the first FROM (build args override them),
  no quotes, escapes or ``${NAME:-default}`` forms in a FROM.
- continued lines: an indented comment line that would end the instruction is refused (engine
  versions disagree on whether it is a comment); ``--from=`` of COPY/ADD/ONBUILD is looked for
  in every reading of a continued line (joined with or without leading blanks and indented
  comments) and is a stage (index or earlier stage name) or an image to check. ONBUILD
  triggers are checked again, as images, when a build uses an image that carries them.
"""

from __future__ import annotations

import bz2
import io
import lzma
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ds01hub.errors import Ds01hubError

MAX_DOCKERFILE = 1024 * 1024
DEFAULT_DOCKERFILE = "Dockerfile"
UNPACK_FACTOR = 8  # a context may unpack to at most this many times its limit (tar bombs)
SCRATCH = "scratch"

# what Go's unicode.IsSpace or Python's str.isspace treat as blank, beyond tab, CR, LF, space
_BAD_CHARS = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
)
_ESCAPE_FIRST_LINE = re.compile(r"^[ \t]*#[ \t]*escape[ \t]*=[ \t]*(\S)[ \t]*$", re.IGNORECASE)
_ESCAPE_ANYWHERE = re.compile(r"^[ \t]*#[ \t]*escape\b", re.IGNORECASE)
_WORD = r"[A-Za-z0-9._:/@+-]"
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_IMAGE_WORD = re.compile(rf"^(?:{_WORD}|\$\{{[A-Za-z_][A-Za-z0-9_]*\}}|\$[A-Za-z_][A-Za-z0-9_]*)+$")
_REFERENCE = re.compile(rf"^{_WORD}+$")
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")
_ARG = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$")
_FROM_FLAG = re.compile(r"(?i)--from=(\S*)")


class ContextError(Ds01hubError, ValueError):
    """A build the proxy cannot read unambiguously; the message says what to change."""


@dataclass(frozen=True)
class ImageUse:
    """One image a build reads: `reference` as the engine will look it up, and where."""

    reference: str
    where: str  # e.g. "FROM (line 3)", "COPY --from (line 7)", "ONBUILD of BASE"


# --------------------------------------------------------------------------------------------
# The tar context


def _decompress(data: bytes, limit: int) -> bytes:
    """The tar stream inside `data` (plain, gzip, bzip2, xz), at most `limit` bytes of it."""
    if data.startswith(b"\x1f\x8b\x08"):
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = _bounded(decoder.decompress, data, limit)
        while decoder.unused_data:  # concatenated gzip members, as Go's multistream reader
            rest = decoder.unused_data
            decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += _bounded(decoder.decompress, rest, limit - len(out))
        return out
    if data.startswith(b"BZh"):
        return _bounded(bz2.BZ2Decompressor().decompress, data, limit)
    if data.startswith(b"\xfd7zXZ\x00"):
        return _bounded(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress, data, limit)
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        raise ContextError("zstd-compressed build contexts are not supported; send a plain tar")
    return data


def _bounded(decompress, data: bytes, limit: int) -> bytes:  # type: ignore[no-untyped-def]
    try:
        out = decompress(data, limit + 1) if limit >= 0 else b""
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as error:
        raise ContextError(f"the build context is not a valid compressed tar: {error}") from None
    if len(out) > limit:
        raise ContextError("the build context unpacks to too much data")
    return out


def _clean(name: str) -> str:
    if ".." in name.split("/"):
        raise ContextError(f"build context entry {name!r} climbs out of the context")
    return posixpath.normpath("/" + name).lstrip("/")


def dockerfile_from_context(data: bytes, dockerfile: str | None, limit: int) -> str:
    """The Dockerfile text the engine would read from this context (see module docstring)."""
    wanted = _clean(dockerfile or DEFAULT_DOCKERFILE)
    if not wanted:
        raise ContextError("the dockerfile parameter names no file")
    stream = _decompress(data, limit * UNPACK_FACTOR)
    entries: dict[str, tuple[bytes, bytes | None]] = {}  # path -> (tar type, regular content)
    links: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(stream), mode="r:") as archive:
            for member in archive:
                path = _clean(member.name)
                parents = path.split("/")[:-1]
                for depth in range(1, len(parents) + 1):
                    if "/".join(parents[:depth]) in links:
                        raise ContextError(
                            f"build context entry {member.name!r} lies below a symbolic link"
                        )
                content = None
                if path in (wanted, wanted.lower()) and member.type in (
                    tarfile.REGTYPE,
                    tarfile.AREGTYPE,
                ):
                    if member.size > MAX_DOCKERFILE:
                        raise ContextError(f"the Dockerfile is larger than {MAX_DOCKERFILE} bytes")
                    extracted = archive.extractfile(member)
                    content = extracted.read() if extracted else b""
                if member.issym():
                    links.add(path)
                else:
                    links.discard(path)
                entries[path] = (member.type, content)
    except tarfile.TarError as error:
        raise ContextError(f"the build context is not a valid tar archive: {error}") from None
    parents = wanted.split("/")[:-1]
    if any("/".join(parents[: i + 1]) in links for i in range(len(parents))):
        raise ContextError(f"the Dockerfile path {wanted!r} passes through a symbolic link")
    for name in _candidates(wanted, entries):
        _, content = entries[name]
        if content is None:
            raise ContextError(
                f"the Dockerfile {name!r} in the build context must be a regular file "
                f"(not a link or directory)"
            )
        try:
            return content.decode("utf-8")
        except UnicodeDecodeError:
            raise ContextError("the Dockerfile is not valid UTF-8") from None
    raise ContextError(f"the build context has no {wanted}")


def _candidates(wanted: str, entries: Mapping[str, object]) -> list[str]:
    if wanted in entries:
        return [wanted]
    if wanted == DEFAULT_DOCKERFILE and wanted.lower() in entries:
        return [wanted.lower()]
    return []


# --------------------------------------------------------------------------------------------
# The Dockerfile


@dataclass(frozen=True)
class _Line:
    number: int  # first physical line, 1-based
    variants: tuple[str, ...]  # the logical line, joined with and without continuation blanks
    physical_lines: int


def _logical_lines(text: str) -> list[_Line]:
    text = text.removeprefix("\ufeff")
    if bad := _BAD_CHARS.search(text):
        raise ContextError(
            f"the Dockerfile contains the control or space character U+{ord(bad.group()):04X}; "
            "only tab, CR and LF are accepted"
        )
    physical = [line.removesuffix("\r") for line in text.split("\n")]
    escape = "\\"
    if physical and (match := _ESCAPE_FIRST_LINE.match(physical[0])):
        escape = match.group(1)
        if escape not in ("\\", "`"):
            raise ContextError(f"invalid escape directive {escape!r} (use \\ or `)")
    for number, line in enumerate(physical[1:], start=2):
        if _ESCAPE_ANYWHERE.match(line):
            raise ContextError(
                f"line {number}: an escape directive is only accepted on the first line"
            )
    continuation = re.compile(re.escape(escape) + r"[ \t]*$")
    lines: list[_Line] = []
    index = 0
    while index < len(physical):
        start = index
        first = physical[index].lstrip()
        index += 1
        if not first or first.startswith("#"):
            continue
        more = continuation.search(first)
        pieces = [(first[: more.start()] if more else first, False)]
        while more and index < len(physical):
            raw = physical[index]
            index += 1
            if not raw.strip() or raw.startswith("#"):
                continue  # the engine skips blank and comment lines inside a continuation
            more = continuation.search(raw)
            indented_comment = raw.lstrip().startswith("#")
            if indented_comment and not more:
                # ends the instruction for one engine version, is skipped by another
                raise ContextError(
                    f"line {index}: a comment inside a continued instruction must start in "
                    "the first column"
                )
            pieces.append((raw[: more.start()] if more else raw, indented_comment))
        variants = []
        for trim in (True, False):
            for keep_indented_comments in (True, False):
                variants.append(
                    "".join(
                        (piece.lstrip() if trim else piece)
                        for piece, indented_comment in pieces
                        if keep_indented_comments or not indented_comment
                    )
                )
        lines.append(_Line(start + 1, tuple(dict.fromkeys(variants)), index - start))
    return lines


def _split(line: str) -> tuple[str, str]:
    parts = re.split(r"[\t\v\f\r ]+", line.strip(), maxsplit=1)
    return parts[0].lower(), parts[1] if len(parts) > 1 else ""


def _expand(word: str, args: Mapping[str, str], where: str) -> str:
    if not _IMAGE_WORD.match(word):
        raise ContextError(
            f"{where}: {word!r} is not accepted through the ds01 proxy: write the image name "
            "plainly or as $NAME / ${NAME} of an ARG declared before the first FROM "
            "(no quotes, escapes or ${NAME:-default})"
        )

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in args:
            raise ContextError(f"{where}: ${name} is not an ARG declared before the first FROM")
        return args[name]

    return _VARIABLE.sub(value, word)


def _meta_arg(rest: str, args: dict[str, str], build_args: Mapping[str, str | None], where: str):  # type: ignore[no-untyped-def]
    match = _ARG.match(rest.strip())
    if not match:
        raise ContextError(
            f"{where}: an ARG before the first FROM must be NAME or NAME=VALUE (one per line)"
        )
    name, default = match.group(1), match.group(2)
    if (
        default is not None
        and len(default) >= 2
        and default[0] == default[-1]
        and default[0] in "\"'"
    ):
        default = default[1:-1]
    if default is not None and default != "":
        default = _expand(default, args, where)
    override = build_args.get(name)
    args[name] = override if override is not None else (default or "")


def image_uses(text: str, build_args: Mapping[str, str | None] | None = None) -> list[ImageUse]:
    """Every image the build reads: FROMs that are not earlier stages, ``--from`` images."""
    build_args = build_args or {}
    args: dict[str, str] = {}
    stages: list[str] = []
    uses: list[ImageUse] = []
    seen_from = False
    for line in _logical_lines(text):
        keywords = {_split(v)[0] for v in line.variants}
        where = f"line {line.number}"
        if "from" in keywords:
            if line.physical_lines > 1 or len(keywords) > 1:
                raise ContextError(f"{where}: write each FROM on a single line")
            seen_from = True
            uses.extend(_from(_split(line.variants[0])[1], args, stages, where))
            continue
        if "arg" in keywords and not seen_from:
            if len(line.variants) > 1 or len(keywords) > 1:
                raise ContextError(f"{where}: write each ARG before the first FROM on one line")
            _meta_arg(_split(line.variants[0])[1], args, build_args, where)
            continue
        if keywords & {"copy", "add", "onbuild"}:
            onbuild = "onbuild" in keywords
            for variant in line.variants:
                for match in _FROM_FLAG.finditer(variant):
                    uses.extend(_copy_from(match.group(1), stages, onbuild, where))
    return list(dict.fromkeys(uses))


def _from(rest: str, args: Mapping[str, str], stages: list[str], where: str) -> list[ImageUse]:
    words = rest.split()
    if any(w.startswith("--") for w in words):
        raise ContextError(f"{where}: FROM flags (such as --platform) are not accepted")
    if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
        raise ContextError(f"{where}: FROM must be 'FROM image' or 'FROM image AS name'")
    image = _expand(words[0], args, f"{where} FROM")
    if not _REFERENCE.match(image):
        raise ContextError(f"{where}: FROM {words[0]} expands to an invalid name {image!r}")
    found: list[ImageUse] = []
    if image.lower() not in stages and image.lower() != SCRATCH:
        found.append(ImageUse(image, f"FROM ({where})"))
    if len(words) == 3:
        name = words[2].lower()
        if not _STAGE_NAME.match(name):
            raise ContextError(f"{where}: invalid stage name {words[2]!r}")
        stages.append(name)
    else:
        stages.append("")
    return found


def _copy_from(value: str, stages: list[str], onbuild: bool, where: str) -> list[ImageUse]:
    if not _REFERENCE.match(value):
        raise ContextError(
            f"{where}: --from={value} is not accepted through the ds01 proxy: name a stage or "
            "an image plainly (no quotes, escapes or variables)"
        )
    if not onbuild and (value.isdigit() or value.lower() in [s for s in stages if s]):
        return []
    return [ImageUse(value, f"{'ONBUILD ' if onbuild else ''}--from ({where})")]


def onbuild_uses(triggers: Iterable[str], image: str) -> list[ImageUse]:
    """Images that a base image's ONBUILD triggers would read (``COPY --from=IMAGE``)."""
    found: list[ImageUse] = []
    for trigger in triggers:
        for match in _FROM_FLAG.finditer(str(trigger)):
            for use in _copy_from(match.group(1), [], True, f"ONBUILD of {image}"):
                found.append(use)
    return found
