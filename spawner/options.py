"""Spawn options, pure: the profile list, the options form and `user_options` validation.

The browser's form and the REST API (CLI, broker, wizard) send the same four keys
(docs/architecture.md, "Spawn options"): `profile`, `image`, `gpus`, `mig`. This module turns
them, with the user's resolved limits and what the machine has, into one `SpawnChoice` or an
`OptionsError` that names the key, the value and what is allowed. No Docker, no hub, no clock:
the spawner gathers the facts (`GpuOffer`, the user's own images) and calls in here, so every
rule is testable on plain data.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jupyterhub.spawner import SpawnException
from pydantic import Field, ValidationInfo, field_validator
from traitlets import Callable as CallableTrait
from traitlets import Dict, HasTraits, List, Union, validate

from ds01hub.bodies import Body, BodyError, parse_data, shown
from ds01hub.errors import Ds01hubError
from ds01hub.gpu.decision import GpuRequest, Holding
from ds01hub.gpu.inventory import Slot
from ds01hub.limits import ResolvedLimits
from ds01hub.mig import PROFILE_FORM, is_profile
from ds01hub.spawn_options import GPUS_OR_MIG, SPAWN_OPTION_KEYS, asks_gpus_and_mig
from ds01hub.units import format_size, parse_size

__all__ = [
    "CUSTOM",
    "OVERRIDE_KEYS",
    "PROFILE_KEYS",
    "GpuOffer",
    "OptionsError",
    "Profile",
    "SpawnChoice",
    "SpawnOptions",
    "allowed_images",
    "image_allowed",
    "normalize_image",
    "normalize_user_options",
    "options_from_form",
    "parse_profile_list",
    "render_form",
    "resolve_choice",
]

#: Keys of one `profile_list` entry (KubeSpawner's shape; `ds01_override` for the overrides).
PROFILE_KEYS = ("display_name", "slug", "description", "default", "ds01_override")
#: Keys of a profile's `ds01_override`.
OVERRIDE_KEYS = ("image", "gpus", "mig", "max_cpus", "memory")
#: The form's own choice besides the configured profiles: "choose the GPU yourself". Reserved
#: as a slug; stored as the `profile` of such a spawn, so the admin pages show the override.
CUSTOM = "custom"

_TEMPLATES = Path(__file__).with_name("templates")


class OptionsError(Ds01hubError, ValueError):
    """A spawn option was refused: `key` and `value` say which, `allowed` what would do;
    `status` is the HTTP status the hub answers with (400 bad value, 403 not allowed)."""

    def __init__(self, key: str, value: Any, problem: str, allowed: str, status: int = 400):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(
            f"spawn option {key!r}={shown(value)}: {problem}; allowed: {allowed}", status=status
        )


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "profile"


@dataclass(frozen=True)
class Profile:
    """One entry of `c.DS01Spawner.profile_list`. The override values are the defaults a user
    gets by picking the profile; `max_cpus`/`memory` can only lower the user's limits."""

    slug: str
    display_name: str
    description: str = ""
    default: bool = False
    image: str | None = None
    gpus: int | None = None
    mig: str | None = None
    max_cpus: float | None = None
    memory: int | None = None

    @classmethod
    def from_config(cls, entry: Any, where: str) -> Profile:
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a dict with display_name, ...; got {entry!r}")
        unknown = sorted(set(entry) - set(PROFILE_KEYS))
        if unknown:
            raise ValueError(
                f"{where} has unknown key(s) {', '.join(unknown)}; known: {', '.join(PROFILE_KEYS)}"
                + (
                    " (ds01hub spells kubespawner_override ds01_override)"
                    if "kubespawner_override" in unknown
                    else ""
                )
            )
        name = entry.get("display_name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}.display_name is required (a non-empty string)")
        override = entry.get("ds01_override") or {}
        if not isinstance(override, Mapping):
            raise ValueError(f"{where}.ds01_override must be a dict, got {override!r}")
        bad = sorted(set(override) - set(OVERRIDE_KEYS))
        if bad:
            raise ValueError(
                f"{where}.ds01_override has unknown key(s) {', '.join(bad)}; "
                f"known: {', '.join(OVERRIDE_KEYS)}"
            )
        try:
            gpus = _read_gpus(override.get("gpus"))
            mig = _read_mig(override.get("mig"))
        except OptionsError as error:
            raise ValueError(f"{where}.ds01_override: {error}") from None
        if asks_gpus_and_mig({"gpus": gpus, "mig": mig}):
            raise ValueError(f"{where}.ds01_override: set {GPUS_OR_MIG}")
        memory = override.get("memory")
        max_cpus = override.get("max_cpus")
        if max_cpus is not None and (isinstance(max_cpus, bool) or float(max_cpus) <= 0):
            raise ValueError(f"{where}.ds01_override.max_cpus must be a positive number")
        return cls(
            slug=str(entry.get("slug") or _slugify(name)),
            display_name=name,
            description=str(entry.get("description") or ""),
            default=bool(entry.get("default", False)),
            image=override.get("image"),
            gpus=gpus,
            mig=mig,
            max_cpus=float(max_cpus) if max_cpus is not None else None,
            memory=parse_size(memory) if memory is not None else None,
        )

    def gpu_text(self) -> str:
        return _gpu_text(self.gpus or 0, self.mig)


def parse_profile_list(entries: Iterable[Any]) -> tuple[Profile, ...]:
    """Validate `profile_list` (unique slugs, at most one default); ValueError names the entry."""
    profiles = tuple(
        Profile.from_config(entry, f"profile_list[{i}]") for i, entry in enumerate(entries)
    )
    slugs = [p.slug for p in profiles]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise ValueError(f"profile_list: duplicate slug(s) {', '.join(duplicates)}; set `slug`")
    if CUSTOM in slugs:
        raise ValueError(
            f"profile_list: the slug {CUSTOM!r} is reserved (the form's 'choose the GPU "
            "yourself'); set another `slug`"
        )
    if sum(p.default for p in profiles) > 1:
        raise ValueError("profile_list: more than one profile has default: true")
    return profiles


def _gpu_text(gpus: int, mig: str | None) -> str:
    if mig:
        return f"1 MIG instance {mig}"
    if gpus:
        return f"{gpus} whole GPU{'s' if gpus > 1 else ''}"
    return "no GPU"


def _read_gpus(value: Any) -> int | None:
    """int >= 0, or a string of digits (the form), or None (not given)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise OptionsError("gpus", value, "not a number", "a whole number >= 0")
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, int) and value >= 0:
        return value
    raise OptionsError("gpus", value, "not a whole number >= 0", "0, 1, 2, ...")


def _read_mig(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not is_profile(value):
        raise OptionsError("mig", value, "not a MIG profile name", PROFILE_FORM)
    return value


class SpawnOptions(Body):
    """`user_options`, from the REST API (CLI, broker, wizard) and from the options form alike:
    known keys only, `gpus` a whole number (the form's digit strings too), the others strings;
    empty strings and None mean "not given"."""

    profile: str | None = Field(
        None, description="the slug of a profile of profile_list (at most 255 printable characters)"
    )
    image: str | None = Field(
        None, description="an image you may use (at most 255 printable characters)"
    )
    gpus: int | None = Field(None, ge=0, description="a whole number of GPUs >= 0: 0, 1, 2, ...")
    mig: str | None = Field(None, description=f"one MIG instance: {PROFILE_FORM}")
    queue: bool = Field(False, description="true (wait for a GPU without a time limit) or false")

    @field_validator("profile", "image", "gpus", "mig", mode="before")
    @classmethod
    def _empty_is_not_given(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("queue", mode="before")
    @classmethod
    def _null_is_false(cls, value: Any) -> Any:
        """null means "not given", as for the other keys."""
        return False if value is None else value

    @field_validator("gpus", mode="before")
    @classmethod
    def _digits_are_a_number(cls, value: Any) -> Any:
        """The form sends numbers as text."""
        if isinstance(value, str) and value.strip().isdigit() and len(value) < 10:
            return int(value.strip())
        return value

    @field_validator("profile", "image")
    @classmethod
    def _a_name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 255 or not value.isprintable()):
            raise ValueError("not a name (at most 255 printable characters)")
        return value.strip() if value is not None else None

    @field_validator("mig")
    @classmethod
    def _a_mig_profile(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A MIG profile name, and not together with whole GPUs (`gpus` is checked first)."""
        if value is not None and not is_profile(value):
            raise ValueError("not a MIG profile name")
        if value is not None and asks_gpus_and_mig({"gpus": info.data.get("gpus"), "mig": value}):
            raise ValueError(f"asked together with gpus={info.data['gpus']}: {GPUS_OR_MIG}")
        return value


def normalize_user_options(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate `user_options` (REST body or form result) with :class:`SpawnOptions`; the keys
    given, typed. OptionsError names the key, the value and what is allowed."""
    try:
        options = parse_data(SpawnOptions, raw, "user_options")
    except BodyError as error:
        key = error.field or "user_options"
        known = ", ".join(SPAWN_OPTION_KEYS)
        allowed = error.hint if error.field and error.reason != "unknown field" else known
        raise OptionsError(key, error.value, error.reason, allowed) from None
    return options.model_dump(exclude_defaults=True)  # the keys given (queue only when true)


def profile_list_trait() -> Union:
    """The `profile_list` setting, declared by each ds01 spawner class (so each lists it in
    its own settings: docs/settings.md)."""
    return Union(
        [List(Dict()), CallableTrait()],
        default_value=[],
        config=True,
        help="""Profiles offered in the options form, in KubeSpawner's shape:
        [{"display_name": "1 GPU, PyTorch", "slug": "gpu", "description": "...",
          "default": True, "ds01_override": {"image": "...", "gpus": 1}}, ...].
        `ds01_override` keys: image, gpus (whole GPUs), mig (a MIG profile), max_cpus and
        memory (these two can only lower the user's limits). May be a callable(spawner) that
        returns the list. Users pick one with the `profile` spawn option.""",
    )


class ProfileList(HasTraits):
    """A ds01 spawner's profiles: `profile_list` (declared by the spawner class with
    `profile_list_trait()`) checked when set, parsed by `_profiles()`."""

    profile_list: Any

    @validate("profile_list")
    def _validate_profile_list(self, proposal: Any) -> Any:
        """A broken profile list is refused when a spawner is made, naming the entry."""
        if not callable(proposal.value):
            parse_profile_list(proposal.value)
        return proposal.value

    def _profiles(self) -> tuple[Profile, ...]:
        entries = self.profile_list(self) if callable(self.profile_list) else self.profile_list
        return parse_profile_list(entries)


def form_user_options(formdata: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """`Spawner.options_from_form` of the ds01 spawners: a bad form is refused (400)."""
    try:
        return options_from_form(formdata)
    except OptionsError as error:
        raise SpawnException(str(error), reason="options", status_code=400) from None


def options_from_form(formdata: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The options form's fields -> the `user_options` keys. The GPU select sends `gpu` as
    `none`, `gpus:N` or `mig:PROFILE`; it counts only without a configured profile (with
    `custom`, or where no profiles exist), so a profile and a GPU choice never disagree."""

    def first(key: str) -> str:
        values = formdata.get(key) or [""]
        return values[0].strip()

    options: dict[str, Any] = {}
    for key in ("profile", "image"):
        if first(key):
            options[key] = first(key)
    gpu = first("gpu") if first("profile") in ("", CUSTOM) else ""
    if gpu == "none":
        options["gpus"] = 0
    elif gpu.startswith("gpus:"):
        options["gpus"] = gpu.removeprefix("gpus:")
    elif gpu.startswith("mig:"):
        options["mig"] = gpu.removeprefix("mig:")
    elif gpu:
        raise OptionsError("gpu", gpu, "not a choice of the form", "none, gpus:N, mig:PROFILE")
    if first("queue") == "on":
        options["queue"] = True
    return normalize_user_options(options)


def normalize_image(image: str) -> str:
    """`repo` and `repo:latest` are the same image (a digest or tag is kept as given)."""
    last = image.rsplit("/", 1)[-1]
    return image if (":" in last or "@" in image) else f"{image}:latest"


def image_allowed(image: str, patterns: Iterable[str]) -> bool:
    """Exact (tag-normalised) or shell-pattern match (`lab/*:2024-*`)."""
    wanted = normalize_image(image)
    return any(wanted == normalize_image(p) or fnmatch.fnmatchcase(image, p) for p in patterns)


def allowed_images(
    limits: ResolvedLimits,
    configured: Sequence[str] | str,
    default_image: str,
    profiles: Sequence[Profile] = (),
) -> tuple[str, ...] | str:
    """The images (or patterns) a user may pick, besides their own built images: the limits'
    `allowed_images` when the YAML sets them (plus the default image), else the spawner's
    `allowed_images` plus the default and the profiles' images. `"*"` = any image."""
    if limits.allowed_images:
        return tuple(dict.fromkeys((default_image, *limits.allowed_images)))
    if configured == "*":
        return "*"
    profile_images = (p.image for p in profiles if p.image)
    return tuple(dict.fromkeys((default_image, *configured, *profile_images)))


@dataclass(frozen=True)
class GpuOffer:
    """What the machine has and what is free now, for the form and for validation."""

    whole_total: int
    whole_free: int
    mig_total: Mapping[str, int]
    mig_free: Mapping[str, int]
    simulated: bool

    @classmethod
    def from_slots(
        cls, slots: Sequence[Slot], holdings: Iterable[Holding], simulated: bool
    ) -> GpuOffer:
        held = {h.slot_id for h in holdings}
        whole = [s for s in slots if s.profile is None]
        mig_total: dict[str, int] = {}
        mig_free: dict[str, int] = {}
        for slot in slots:
            if slot.profile:
                mig_total[slot.profile] = mig_total.get(slot.profile, 0) + 1
                mig_free[slot.profile] = mig_free.get(slot.profile, 0) + (slot.id not in held)
        return cls(
            whole_total=len(whole),
            whole_free=sum(s.id not in held for s in whole),
            mig_total=mig_total,
            mig_free=mig_free,
            simulated=simulated,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON for the notebook's QuotaPanel (`ds01hub.units.gpus_free_text` reads it)."""
        return {
            "whole": {"free": self.whole_free, "total": self.whole_total},
            "mig": {
                profile: {"free": self.mig_free[profile], "total": total}
                for profile, total in sorted(self.mig_total.items())
            },
            "simulated": self.simulated,
        }


@dataclass(frozen=True)
class SpawnChoice:
    """A validated spawn: what to run and which GPUs to ask the allocator for."""

    image: str
    gpus: int = 0
    mig: str | None = None
    profile: str | None = None
    max_cpus: float | None = None
    memory: int | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)
    #: Wait for a GPU without `gpu_wait_timeout`: the request is stored (`spawner.queued`).
    queue: bool = False

    @property
    def wants_gpu(self) -> bool:
        return bool(self.gpus or self.mig)

    def gpu_request(self, user: str, container: str) -> GpuRequest:
        if self.mig:
            return GpuRequest(user, container, count=1, mig_profile=self.mig)
        return GpuRequest(user, container, count=self.gpus, whole_gpu=self.gpus > 0)

    def gpu_text(self) -> str:
        return _gpu_text(self.gpus, self.mig)

    def user_options(self) -> dict[str, Any]:
        """The normalised options as JupyterHub stores them (and the CLI shows them)."""
        options: dict[str, Any] = {"image": self.image, "gpus": self.gpus}
        if self.mig:
            options = {"image": self.image, "mig": self.mig}
        if self.profile:
            options["profile"] = self.profile
        if self.queue:
            options["queue"] = True
        return options


def _choose_profile(options: Mapping[str, Any], profiles: Sequence[Profile]) -> Profile | None:
    slug = options.get("profile")
    if slug == CUSTOM:
        return None
    if slug is None:
        return next((p for p in profiles if p.default), None)
    for profile in profiles:
        if profile.slug == slug:
            return profile
    raise OptionsError(
        "profile",
        slug,
        "no such profile",
        ", ".join([*(p.slug for p in profiles), CUSTOM]),
    )


def _check_gpus(gpus: int, limits: ResolvedLimits, offer: GpuOffer) -> None:
    cap = limits.gpus_per_container
    if cap is not None and gpus > cap:
        raise OptionsError(
            "gpus",
            gpus,
            f"over your limit of {cap} GPU(s) per container ({_limit_source(limits)})",
            f"0 to {cap}",
            status=403,
        )
    if not limits.allow_full_gpu:
        raise OptionsError(
            "gpus",
            gpus,
            "your limits allow MIG instances only (allow_full_gpu: false)",
            "mig with one of " + (", ".join(sorted(offer.mig_total)) or "no MIG profiles here"),
            status=403,
        )
    if gpus > offer.whole_total:
        raise OptionsError(
            "gpus",
            gpus,
            f"this machine has {offer.whole_total} whole GPU(s)",
            f"0 to {min(offer.whole_total, cap if cap is not None else offer.whole_total)}",
        )


def _check_mig(mig: str, limits: ResolvedLimits, offer: GpuOffer) -> None:
    if mig not in offer.mig_total:
        raise OptionsError(
            "mig",
            mig,
            "no MIG instances of this profile on this machine",
            ", ".join(sorted(offer.mig_total)) or "none (no MIG instances here)",
        )
    cap = limits.gpus_per_container
    if cap is not None and cap < 1:
        raise OptionsError(
            "mig",
            mig,
            f"your limits allow no GPU ({_limit_source(limits)})",
            "no GPU",
            status=403,
        )


def _limit_source(limits: ResolvedLimits) -> str:
    return f"group {limits.group}" if limits.group else "the defaults"


def resolve_choice(
    options: Mapping[str, Any],
    *,
    profiles: Sequence[Profile],
    limits: ResolvedLimits,
    default_image: str,
    images: Sequence[str] | str,
    own_images: Iterable[str],
    offer: GpuOffer,
) -> SpawnChoice:
    """Validated `user_options` -> SpawnChoice. Explicit keys win over the profile's override;
    `images` is `allowed_images(...)`; `own_images` the tags the user built (checked by owner
    label and namespace by the caller)."""
    options = normalize_user_options(options)
    profile = _choose_profile(options, profiles)
    image = options.get("image") or (profile.image if profile else None) or default_image
    own = tuple(own_images)
    if not (images == "*" or image_allowed(image, images) or image_allowed(image, own)):
        listed = [*images, *own]
        raise OptionsError(
            "image",
            image,
            "not an image you may use",
            ", ".join(listed) + " (or an image you built: ds01-<you>/NAME, see image-create)",
            status=403,
        )
    if "gpus" in options or "mig" in options:
        gpus, mig = options.get("gpus", 0), options.get("mig")
    else:
        gpus, mig = (profile.gpus or 0, profile.mig) if profile else (0, None)
    if mig:
        _check_mig(mig, limits, offer)
        gpus = 0
    elif gpus:
        _check_gpus(gpus, limits, offer)
    notes = []
    max_cpus, memory = limits.max_cpus, limits.memory
    if profile and profile.max_cpus is not None:
        if max_cpus is not None and profile.max_cpus > max_cpus:
            notes.append(f"profile asks {profile.max_cpus:g} CPUs; your limit {max_cpus:g} applies")
        else:
            max_cpus = profile.max_cpus
    if profile and profile.memory is not None:
        if memory is not None and profile.memory > memory:
            notes.append(
                f"profile asks {format_size(profile.memory)} memory; your limit "
                f"{format_size(memory)} applies"
            )
        else:
            memory = profile.memory
    return SpawnChoice(
        image=image,
        gpus=gpus,
        mig=mig,
        profile=profile.slug if profile else options.get("profile"),
        max_cpus=max_cpus,
        memory=memory,
        notes=tuple(notes),
        queue=bool(options.get("queue")),
    )


# -- the options form ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _GpuOption:
    value: str
    text: str


def _gpu_options(limits: ResolvedLimits, offer: GpuOffer) -> list[_GpuOption]:
    """`none`, `gpus:1..N` within the user's limits and the machine, each MIG profile; the
    free counts are a snapshot (a busy choice can still be picked: the spawn then queues)."""
    sim = " (SIMULATED)" if offer.simulated else ""
    choices = [_GpuOption("none", "no GPU")]
    cap = limits.gpus_per_container
    if limits.allow_full_gpu:
        most = offer.whole_total if cap is None else min(cap, offer.whole_total)
        for n in range(1, most + 1):
            choices.append(
                _GpuOption(
                    f"gpus:{n}",
                    f"{_gpu_text(n, None)}{sim} - "
                    f"{offer.whole_free} of {offer.whole_total} free now",
                )
            )
    if cap is None or cap >= 1:
        for profile in sorted(offer.mig_total):
            choices.append(
                _GpuOption(
                    f"mig:{profile}",
                    f"MIG {profile}{sim} - {offer.mig_free.get(profile, 0)} of "
                    f"{offer.mig_total[profile]} free now",
                )
            )
    return choices


def _profile_problem(
    profile: Profile, limits: ResolvedLimits, offer: GpuOffer, images: Sequence[str] | str
) -> str | None:
    """Why this user cannot pick the profile (shown, and the radio disabled), or None."""
    try:
        if profile.mig:
            _check_mig(profile.mig, limits, offer)
        elif profile.gpus:
            _check_gpus(profile.gpus, limits, offer)
    except OptionsError as error:
        return str(error).split(": ", 1)[1]
    if profile.image and images != "*" and not image_allowed(profile.image, images):
        return f"image {profile.image} is not allowed for you"
    return None


@dataclass(frozen=True)
class _ProfileView:
    """One profile as the form shows it: what it gives, how many such slots are free now
    (`free`, `total`; None without a GPU) and why it cannot be picked (`problem`)."""

    slug: str
    display_name: str
    description: str
    gives: str
    free: int | None
    total: int | None
    wanted: int
    problem: str | None

    @property
    def free_text(self) -> str:
        if self.free is None:
            return ""
        return f"{self.free} of {self.total} free now"

    @property
    def free_now(self) -> bool:
        return self.free is not None and self.free >= self.wanted


def _profile_view(
    profile: Profile,
    limits: ResolvedLimits,
    offer: GpuOffer,
    images: Sequence[str] | str,
    default_image: str,
) -> _ProfileView:
    sim = " (SIMULATED)" if offer.simulated and (profile.gpus or profile.mig) else ""
    cpus = _tighter(profile.max_cpus, limits.max_cpus)
    memory = _tighter(profile.memory, limits.memory)
    gives = [
        profile.gpu_text() + sim,
        f"{cpus:g} CPU{'s' if cpus != 1 else ''}" if cpus is not None else "CPUs unlimited",
        f"{format_size(int(memory))} memory" if memory is not None else "memory unlimited",
        f"image {profile.image or default_image}",
    ]
    if profile.mig:
        free, total = offer.mig_free.get(profile.mig, 0), offer.mig_total.get(profile.mig, 0)
    elif profile.gpus:
        free, total = offer.whole_free, offer.whole_total
    else:
        free = total = None
    return _ProfileView(
        slug=profile.slug,
        display_name=profile.display_name,
        description=profile.description,
        gives=", ".join(gives),
        free=free,
        total=total,
        wanted=1 if profile.mig else profile.gpus or 0,
        problem=_profile_problem(profile, limits, offer, images),
    )


def _tighter(profile_value: float | None, limit: float | None) -> float | None:
    """What applies: the profile's value can only lower the user's limit (`resolve_choice`)."""
    if profile_value is None:
        return limit
    return profile_value if limit is None else min(profile_value, limit)


def render_form(
    *,
    profiles: Sequence[Profile],
    limits: ResolvedLimits,
    offer: GpuOffer,
    images: Sequence[str] | str,
    own_images: Sequence[str],
    default_image: str,
    previous: Mapping[str, Any] | None = None,
    queue_offered: bool = True,
) -> str:
    """The options form's HTML (Jinja2, autoescaped; Bootstrap 5 like the hub's pages): one
    choice of GPU: a profile (what it gives, how many such slots are free now), or "choose the
    GPU yourself" with a select bounded by the user's limits; then the image. The "wait for a
    GPU without a time limit" box (the `queue` option) only where the spawner serves it
    (`queue_offered`: not on a swarm)."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    previous = previous or {}
    views = [_profile_view(p, limits, offer, images, default_image) for p in profiles]
    usable = {v.slug for v in views if v.problem is None} | {CUSTOM}
    chosen = previous.get("profile") or next((p.slug for p in profiles if p.default), None)
    if profiles and chosen not in usable:
        chosen = next((v.slug for v in views if v.problem is None), CUSTOM)
    image_choices = [default_image] if images == "*" else [i for i in images if "*" not in i]
    image_choices += [i for i in own_images if i not in image_choices]
    return environment.get_template("options_form.html").render(
        profiles=views,
        custom=CUSTOM,
        chosen_profile=chosen,
        images=image_choices,
        own_images=set(own_images),
        chosen_image=previous.get("image", ""),
        gpu_options=_gpu_options(limits, offer),
        chosen_gpu=_previous_gpu(previous),
        limits=limits,
        offer=offer,
        format_size=format_size,
        queue_offered=queue_offered,
    )


def _previous_gpu(previous: Mapping[str, Any]) -> str:
    if previous.get("mig"):
        return f"mig:{previous['mig']}"
    if previous.get("gpus"):
        return f"gpus:{previous['gpus']}"
    return "none"
