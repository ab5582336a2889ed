"""NVIDIA MIG profile names: the one grammar every part of ds01hub reads them with.

A GPU instance profile is N compute slices (1, 2, 3, 4 or 7) and M GB of memory, optionally
with the media engines: `1g.10gb`, `2g.20gb`, `3g.40gb`, `7g.80gb`, `1g.10gb+me`, `1g.18gb`
(H200). The limits file, the spawn options (`profile_list`, the form, `user_options`), the
inventory (the name NVML gives a MIG device) and the simulated NVML all use `parse_profile`, so
a profile one of them accepts is never refused by another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: What a profile name looks like, for error messages.
PROFILE_FORM = "<1|2|3|4|7>g.<GB>gb[+me], e.g. 1g.10gb, 2g.20gb, 3g.40gb"

_PROFILE = r"([12347])g\.([1-9][0-9]{0,3})gb(\+me)?"
_WHOLE = re.compile(_PROFILE)
# in a device name ("NVIDIA H100 80GB HBM3 MIG 2g.20gb"): the profile, not part of a word
_IN_NAME = re.compile(rf"(?<![\w.]){_PROFILE}(?![\w.+])")


@dataclass(frozen=True)
class MigProfile:
    """A parsed profile name: `slices` compute slices, `gigabytes` of memory, `media` engines."""

    name: str
    slices: int
    gigabytes: int
    media: bool

    @property
    def memory_mb(self) -> int:
        """The profile's nominal memory in MiB (its name's GB)."""
        return self.gigabytes * 1024


def _profile(match: re.Match[str]) -> MigProfile:
    return MigProfile(match.group(0), int(match.group(1)), int(match.group(2)), bool(match[3]))


def parse_profile(text: object) -> MigProfile | None:
    """`text` as a profile, or None when it is not exactly one (any type is answered)."""
    match = _WHOLE.fullmatch(text) if isinstance(text, str) else None
    return _profile(match) if match else None


def is_profile(text: object) -> bool:
    return parse_profile(text) is not None


def profile_in_device_name(name: str) -> MigProfile | None:
    """The profile NVML names in a MIG device's name, or None when it names none we know."""
    match = _IN_NAME.search(name)
    return _profile(match) if match else None
