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
from fractions import Fraction

#: Compute slices of a MIG-capable GPU (A100, H100, H200, B200: 7; a `7g` profile is the whole GPU).
COMPUTE_SLICES = 7

#: The MIG-capable models with fewer compute slices (NVIDIA's MIG user guide: the A30 has 4,
#: its whole-GPU profile is `4g.24gb`), by a word of the model's name.
_MODEL_SLICES = {"A30": 4}

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


def model_compute_slices(name: str) -> int:
    """A GPU's compute slices from its model name (`NVIDIA A30` -> 4), COMPUTE_SLICES for
    every other model: what the inventory uses where NVML's MIG profile info says nothing."""
    words = set(re.findall(r"[A-Z0-9]+", name.upper()))
    return next((n for model, n in _MODEL_SLICES.items() if model in words), COMPUTE_SLICES)


def gpu_share(profile: str | None, slices: int = COMPUTE_SLICES) -> Fraction:
    """The share of a GPU's compute that a slot is (GPU equivalents): a whole GPU (`None`) is 1,
    a MIG instance its compute slices of its GPU's `slices` (`2g.20gb` of a 7-slice A100 = 2/7,
    `2g.12gb` of a 4-slice A30 = 1/2). A name that is not a profile counts as a whole GPU: a
    quota never undercounts what it cannot read."""
    parsed = parse_profile(profile) if profile is not None else None
    if parsed is None or slices < 1:
        return Fraction(1)
    return Fraction(min(parsed.slices, slices), slices)


def format_share(share: Fraction) -> str:
    """`1`, `2.5`, `0.29 (2/7)`: exact when a decimal is, with the fraction when it is not."""
    if share.denominator == 1:
        return str(share.numerator)
    if 1000 % share.denominator == 0:
        return f"{float(share):g}"
    return f"{float(share):.2f} ({share.numerator}/{share.denominator})"
