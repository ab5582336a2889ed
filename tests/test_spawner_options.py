"""DS01Spawner's pure parts: spawn options, profiles, the options form, the container plan and
the GPU wait queue (no Docker, no hub)."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from html.parser import HTMLParser

import pytest
from harness import wait_until_async
from harness.inspect_docs import TRUST

from ds01hub.gpu.decision import Decision, Holding
from ds01hub.gpu.inventory import Slot
from ds01hub.limits import parse_limits
from ds01hub.spawn_options import SPAWN_OPTION_KEYS
from ds01hub.spawner.container_plan import ContainerPlan, recreate_reason
from ds01hub.spawner.gpu_queue import GpuQueue, GpuWaitTimeout
from ds01hub.spawner.options import (
    GpuOffer,
    OptionsError,
    SpawnChoice,
    SpawnOptions,
    allowed_images,
    image_allowed,
    normalize_user_options,
    options_from_form,
    parse_profile_list,
    render_form,
    resolve_choice,
)

DEFAULT_IMAGE = "ds01hub/singleuser:latest"
LIMITS = parse_limits(
    {
        "defaults": {"max_gpus": 1, "max_gpus_per_container": 1, "max_cpus": 2, "memory": "4g"},
        "groups": {
            "students": {"members": ["alice"], "priority": 10},
            "researchers": {
                "members": ["carol"],
                "max_gpus": 4,
                "max_gpus_per_container": 2,
                "max_cpus": 8,
                "memory": "32g",
                "priority": 50,
            },
            "migonly": {"members": ["mo"], "allow_full_gpu": False},
            "curated": {"members": ["cu"], "allowed_images": ["lab/torch:*"]},
        },
    }
)
SLOTS = [
    Slot("0", 0, "GPU-a", "A100", None, 81920, True),
    Slot("1", 1, "GPU-b", "A100", None, 81920, True),
    Slot("2:0", 2, "MIG-c0", "A100 MIG 2g.20gb", "2g.20gb", 20480, True),
    Slot("2:1", 2, "MIG-c1", "A100 MIG 2g.20gb", "2g.20gb", 20480, True),
]
OFFER = GpuOffer.from_slots(SLOTS, [Holding("0", "bob", "x._.bob", "running", 10)], True)
PROFILES = parse_profile_list(
    [
        {"display_name": "CPU only", "default": True},
        {
            "display_name": "One GPU",
            "slug": "gpu",
            "description": "PyTorch on a whole A100",
            "ds01_override": {"image": "lab/torch:2", "gpus": 1, "max_cpus": 1},
        },
        {"display_name": "Two GPUs", "ds01_override": {"gpus": 2, "memory": "64g"}},
        {"display_name": "MIG slice", "slug": "mig", "ds01_override": {"mig": "2g.20gb"}},
    ]
)


def choose(options, user="alice", own=(), configured=("lab/torch:2",)):
    limits = LIMITS.resolve(user)
    return resolve_choice(
        options,
        profiles=PROFILES,
        limits=limits,
        default_image=DEFAULT_IMAGE,
        images=allowed_images(limits, list(configured), DEFAULT_IMAGE, PROFILES),
        own_images=own,
        offer=OFFER,
    )


def refusal(options, **kw) -> OptionsError:
    with pytest.raises(OptionsError) as caught:
        choose(options, **kw)
    return caught.value


# -- options ------------------------------------------------------------------------------------


def test_user_options_are_typed_and_unknown_keys_named():
    assert normalize_user_options({"gpus": "2", "image": " x ", "mig": None}) == {
        "gpus": 2,
        "image": "x",
    }
    assert normalize_user_options(None) == {}
    error = pytest.raises(OptionsError, normalize_user_options, {"gpu": 1, "cpus": 2}).value
    assert str(error) == (
        "spawn option 'gpu'=1: unknown field; allowed: profile, image, gpus, mig, queue"
    )
    assert tuple(SpawnOptions.model_fields) == SPAWN_OPTION_KEYS  # one list of keys
    for bad in (-1, 1.5, True, "two"):
        error = pytest.raises(OptionsError, normalize_user_options, {"gpus": bad}).value
        assert error.key == "gpus" and error.value == bad
    error = pytest.raises(OptionsError, normalize_user_options, {"gpus": 1, "mig": "1g.10gb"})
    assert "not both" in str(error.value) and error.value.key == "mig"
    assert pytest.raises(OptionsError, normalize_user_options, {"mig": "big"}).value.key == "mig"


def test_form_fields_become_the_same_keys_as_rest():
    assert options_from_form({"profile": ["gpu"], "image": [""], "gpu": [""]}) == {"profile": "gpu"}
    # One choice of GPU: a configured profile brings its own; the select counts with custom.
    assert options_from_form({"profile": ["cpu-only"], "gpu": ["gpus:1"]}) == {
        "profile": "cpu-only"
    }
    assert options_from_form({"profile": ["custom"], "gpu": ["gpus:1"]}) == {
        "profile": "custom",
        "gpus": 1,
    }
    assert options_from_form({"gpu": ["none"]}) == {"gpus": 0}
    assert options_from_form({"gpu": ["gpus:2"], "image": ["lab/torch:2"]}) == {
        "gpus": 2,
        "image": "lab/torch:2",
    }
    assert options_from_form({"gpu": ["mig:2g.20gb"]}) == {"mig": "2g.20gb"}
    assert pytest.raises(OptionsError, options_from_form, {"gpu": ["all"]}).value.key == "gpu"


def test_default_profile_then_explicit_keys_win():
    assert choose({}) == SpawnChoice(DEFAULT_IMAGE, 0, None, "cpu-only", 2.0, 4 << 30)
    gpu = choose({"profile": "gpu"})
    assert (gpu.image, gpu.gpus, gpu.max_cpus, gpu.memory) == ("lab/torch:2", 1, 1.0, 4 << 30)
    assert gpu.gpu_request("alice", "c").whole_gpu is True
    assert choose({"profile": "gpu", "gpus": 0}).gpus == 0
    mig = choose({"profile": "gpu", "mig": "2g.20gb"})
    assert (mig.gpus, mig.mig, mig.image) == (0, "2g.20gb", "lab/torch:2")
    assert mig.gpu_request("alice", "c").mig_profile == "2g.20gb"
    assert mig.user_options() == {"image": "lab/torch:2", "mig": "2g.20gb", "profile": "gpu"}


def test_the_custom_choice_is_stored_as_the_profile_and_takes_no_default():
    custom = choose({"profile": "custom", "gpus": 1})
    assert (custom.profile, custom.gpus, custom.image, custom.max_cpus) == (
        "custom",
        1,
        DEFAULT_IMAGE,
        2.0,
    )
    assert custom.user_options()["profile"] == "custom"
    assert choose({"profile": "custom"}).gpus == 0
    with pytest.raises(ValueError, match="slug 'custom' is reserved"):
        parse_profile_list([{"display_name": "Custom"}])


def test_profile_asking_more_than_the_limits_gets_the_limit_and_says_so():
    two = choose({"profile": "two-gpus"}, user="carol")
    assert (two.gpus, two.memory) == (2, 32 << 30)
    assert two.notes == ("profile asks 64g memory; your limit 32g applies",)


def test_refusals_name_key_value_and_what_is_allowed():
    error = refusal({"profile": "huge"})
    assert (error.key, error.status) == ("profile", 400)
    assert str(error).endswith("allowed: cpu-only, gpu, two-gpus, mig, custom")
    error = refusal({"gpus": 2})
    assert str(error) == (
        "spawn option 'gpus'=2: over your limit of 1 GPU(s) per container (group students); "
        "allowed: 0 to 1"
    )
    assert error.status == 403
    assert str(refusal({"gpus": 3}, user="carol")).endswith("allowed: 0 to 2")
    error = refusal({"mig": "1g.10gb"})
    assert str(error).endswith("no MIG instances of this profile on this machine; allowed: 2g.20gb")
    error = refusal({"gpus": 1}, user="mo")
    assert "MIG instances only" in str(error) and "2g.20gb" in error.allowed
    assert choose({"mig": "2g.20gb"}, user="mo").mig == "2g.20gb"


def test_images_allowed_default_profile_limits_patterns_and_own():
    error = refusal({"image": "busybox"})
    assert (error.key, error.status) == ("image", 403)
    assert DEFAULT_IMAGE in error.allowed and "lab/torch:2" in error.allowed
    assert choose({"image": "ds01hub/singleuser"}).image == "ds01hub/singleuser"  # :latest
    own = ("ds01-alice/mine:latest",)
    assert choose({"image": "ds01-alice/mine"}, own=own).image == "ds01-alice/mine"
    assert refusal({"image": "ds01-bob/mine"}, own=own).key == "image"
    # The YAML's allowed_images (patterns) replace the spawner's list for that group.
    assert choose({"image": "lab/torch:2.3"}, user="cu").image == "lab/torch:2.3"
    assert refusal({"image": "lab/jax:1"}, user="cu").key == "image"
    assert choose({"image": "anything:1"}, configured="*").image == "anything:1"
    assert image_allowed("a/b", ["a/b:latest"]) and not image_allowed("a/b:2", ["a/b"])


def test_profile_list_is_validated_with_the_entry_named():
    with pytest.raises(ValueError, match=r"profile_list\[0\] has unknown key\(s\) kubespawner"):
        parse_profile_list([{"display_name": "x", "kubespawner_override": {}}])
    with pytest.raises(ValueError, match=r"profile_list\[1\].display_name is required"):
        parse_profile_list([{"display_name": "x"}, {"slug": "y"}])
    with pytest.raises(ValueError, match="duplicate slug"):
        parse_profile_list([{"display_name": "A b"}, {"display_name": "a-b"}])
    with pytest.raises(ValueError, match=r"ds01_override has unknown key\(s\) cpus"):
        parse_profile_list([{"display_name": "x", "ds01_override": {"cpus": 2}}])
    with pytest.raises(ValueError, match="more than one profile has default"):
        parse_profile_list(
            [{"display_name": "a", "default": 1}, {"display_name": "b", "default": 1}]
        )


# -- the options form ---------------------------------------------------------------------------


class _Fields(HTMLParser):
    def __init__(self):
        super().__init__()
        self.inputs: list[dict] = []
        self.options: list[tuple[dict, str]] = []
        self._option: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "input":
            self.inputs.append(attrs)
        elif tag == "option":
            self._option = attrs

    def handle_data(self, data):
        if self._option is not None:
            self.options.append((self._option, data.strip()))
            self._option = None


def form_for(user: str, previous=None) -> _Fields:
    limits = LIMITS.resolve(user)
    html = render_form(
        profiles=PROFILES,
        limits=limits,
        offer=OFFER,
        images=allowed_images(limits, ["lab/torch:2"], DEFAULT_IMAGE, PROFILES),
        own_images=["ds01-alice/<b>:latest"],
        default_image=DEFAULT_IMAGE,
        previous=previous,
    )
    assert "<b>" not in html  # escaped
    fields = _Fields()
    fields.feed(html)
    return fields


def test_form_offers_what_the_limits_allow_and_what_is_free():
    fields = form_for("alice")
    radios = {i["value"]: i for i in fields.inputs if i.get("name") == "profile"}
    assert set(radios) == {"cpu-only", "gpu", "two-gpus", "mig", "custom"}
    assert "disabled" in radios["two-gpus"] and "disabled" not in radios["gpu"]
    assert "checked" in radios["cpu-only"]
    gpu_values = {
        o["value"]: text
        for o, text in fields.options
        if o["value"].startswith(("gpus:", "mig:", "none"))
    }
    assert set(gpu_values) == {"none", "gpus:1", "mig:2g.20gb"}
    assert gpu_values["gpus:1"] == "1 whole GPU (SIMULATED) - 1 of 2 free now"
    assert gpu_values["mig:2g.20gb"] == "MIG 2g.20gb (SIMULATED) - 2 of 2 free now"
    carol = form_for("carol", previous={"profile": "two-gpus", "gpus": 2})
    selected = [o["value"] for o, _ in carol.options if "selected" in o]
    assert "gpus:2" in selected
    radios = {i["value"]: i for i in carol.inputs if i.get("name") == "profile"}
    assert "checked" in radios["two-gpus"]
    custom = form_for("alice", previous={"profile": "custom", "mig": "2g.20gb"})
    radios = {i["value"]: i for i in custom.inputs if i.get("name") == "profile"}
    assert "checked" in radios["custom"]
    assert [o["value"] for o, _ in custom.options if "selected" in o][0] == "mig:2g.20gb"


def test_each_profile_says_what_it_gives_and_how_many_are_free():
    html = render_form(
        profiles=PROFILES,
        limits=LIMITS.resolve("carol"),
        offer=OFFER,
        images="*",
        own_images=[],
        default_image=DEFAULT_IMAGE,
    )
    badges = re.findall(r'data-free="(\d+)" data-total="(\d+)">([^<]*)<', html)
    # one whole GPU of two is held (OFFER): the GPU profiles say so; the MIG one its own kind
    assert badges == [
        ("1", "2", "1 of 2 free now"),
        ("1", "2", "1 of 2 free now"),
        ("2", "2", "2 of 2 free now"),
    ]
    assert "1 whole GPU (SIMULATED), 1 CPU, 32g memory, image lab/torch:2" in html
    assert "2 whole GPUs (SIMULATED), 8 CPUs, 32g memory" in html  # the limit, not 64g
    assert "None free now: you would wait in line" in html  # two GPUs wanted, one free
    assert 'class="form-text' in html and "help-block" not in html


# -- the container plan -------------------------------------------------------------------------


def plan_for(slots=(), user="carol", **kw) -> ContainerPlan:
    limits = LIMITS.resolve(user)
    limits = replace(limits, shm_size=1 << 30, pids_limit=512, cgroup_parent="/ds01/res")
    choice = SpawnChoice(DEFAULT_IMAGE, len(slots), None, None, limits.max_cpus, limits.memory)
    kw.setdefault("name", "thesis._.carol")
    return ContainerPlan(user, "thesis", limits, choice, tuple(slots), True, trust=TRUST, **kw)


def test_plan_has_limits_device_requests_env_and_labels():
    plan = plan_for(SLOTS[:2], run_as=(1001, 100), workspace=("/srv/ws/carol", "/workspace"))
    host = plan.host_config()
    assert host["nano_cpus"] == 8 * 10**9 and host["mem_limit"] == host["memswap_limit"]
    assert (host["shm_size"], host["pids_limit"], host["cgroup_parent"]) == (
        1 << 30,
        512,
        "/ds01/res",
    )
    assert host["device_requests"] == [
        {"driver": "nvidia", "device_ids": ["GPU-a", "GPU-b"], "capabilities": [["gpu"]]}
    ]
    assert host["binds"] == {"/srv/ws/carol": {"bind": "/workspace", "mode": "rw"}}
    env = plan.environment()
    assert env["CUDA_VISIBLE_DEVICES"] == env["NVIDIA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    assert (env["DS01_GPUS"], env["DS01_GPUS_SIMULATED"], env["HOME"]) == (
        "0,1",
        "1",
        "/workspace",
    )
    kwargs = plan.create_kwargs()
    assert kwargs["user"] == "1001:100"
    assert kwargs["labels"]["ds01.gpus"] == "0,1" and kwargs["labels"]["ds01.group"] == (
        "researchers"
    )
    assert plan_for().environment()["NVIDIA_VISIBLE_DEVICES"] == "void"


def inspect_of(plan: ContainerPlan) -> dict:
    """What `docker inspect` shows for a container created from `plan`."""
    host = plan.host_config()
    return {
        "Id": "c1",
        "Name": "/thesis._.carol",
        "Config": {"Image": plan.choice.image, "Labels": plan.labels(), "User": ""},
        "State": {"Status": "exited", "FinishedAt": "2026-01-01T00:00:00Z"},
        "HostConfig": {
            "NanoCpus": host["nano_cpus"],
            "Memory": host["mem_limit"],
            "MemorySwap": host["memswap_limit"],
            "ShmSize": host["shm_size"],
            "PidsLimit": host["pids_limit"],
            "CgroupParent": host["cgroup_parent"],
        },
    }


def test_a_restart_recreates_only_when_gpus_image_or_limits_changed():
    plan = plan_for(SLOTS[:1])
    attrs = inspect_of(plan)
    assert recreate_reason(attrs, plan) is None
    assert recreate_reason(attrs, plan_for(SLOTS[1:2])) == "its GPU slots changed (0 -> 1)"
    assert "image changed" in recreate_reason(
        attrs, replace(plan, choice=replace(plan.choice, image="other:1"))
    )
    lower = replace(plan, choice=replace(plan.choice, memory=1 << 30))
    assert recreate_reason(attrs, lower).startswith("the limits changed (Memory")
    unlabelled = {**attrs, "Config": {**attrs["Config"], "Labels": {}}}
    assert "not signed by this hub" in recreate_reason(unlabelled, plan)
    renamed = {**attrs, "Name": "/other"}  # the signature covers the name
    assert "not signed by this hub" in recreate_reason(renamed, plan)


def test_the_plan_signs_every_key_and_blanks_the_images_reserved_ones():
    image_labels = {"ds01.user": "mallory", "ds01.gpus": "0", "ds01.extra": "x", "mine": "1"}
    found = plan_for(image_labels=image_labels).labels()
    assert found["ds01.user"] == "carol" and found["ds01.gpus"] == ""
    assert found["ds01.extra"] == "" and "mine" not in found  # Docker merges "mine" itself
    assert TRUST.verify(found, "thesis._.carol") and not TRUST.verify(found, "x._.carol")


# -- the GPU wait queue -------------------------------------------------------------------------


BUSY = Decision(reason="no free GPU slot: slot 0: bob", code="busy")


class FakeSlots:
    """A pool of N identical slots standing in for the allocator (the queue's only input)."""

    def __init__(self, free: int):
        self.free = free
        self.granted: list[str] = []
        self.released: list[str] = []

    def attempt_for(self, key: str):
        async def attempt() -> Decision:
            await asyncio.sleep(0)
            if self.free > 0:
                self.free -= 1
                self.granted.append(key)
                return Decision(granted=(key,))
            return BUSY

        return attempt

    async def abandon(self, decision: Decision) -> None:
        self.free += 1
        self.released.append(decision.granted[0])


async def test_queue_serves_priority_then_arrival_and_reports_positions():
    queue = GpuQueue(recheck_interval=60)
    pool = FakeSlots(free=1)
    positions: dict[str, list[tuple[int, int]]] = {}

    def waiter(key: str, priority: int):
        def on_wait(status):
            positions.setdefault(key, []).append((status.position, status.waiting))

        return queue.acquire(
            key,
            priority,
            pool.attempt_for(key),
            user=key,
            timeout=30,
            abandon=pool.abandon,
            on_wait=on_wait,
        )

    first = asyncio.create_task(waiter("first", 10))
    await wait_until_async(first.done, 10, message="the first waiter is served")
    low = asyncio.create_task(waiter("low", 10))
    await wait_until_async(lambda: "low" in positions, 10, message="low waits")
    high = asyncio.create_task(waiter("high", 50))
    await wait_until_async(lambda: "high" in positions, 10, message="high waits")
    assert (await first).granted == ("first",)
    assert queue.keys() == ["high", "low"]
    assert positions["high"][-1] == (1, 2) and positions["low"][-1] == (2, 2)
    pool.free += 1
    queue.notify()
    assert (await high).granted == ("high",)
    assert not low.done()
    pool.free += 1
    queue.notify()
    assert (await low).granted == ("low",)
    assert pool.granted == ["first", "high", "low"]


async def test_queue_fails_fast_on_refusals_that_waiting_cannot_fix():
    queue = GpuQueue(recheck_interval=60)

    async def over_quota() -> Decision:
        return Decision(reason="alice holds 1 of max 1", code="user_limit")

    decision = await queue.acquire("k", 10, over_quota, user="u", timeout=5, abandon=None)
    assert decision.code == "user_limit" and len(queue) == 0


async def test_queue_rechecks_periodically_and_times_out_with_the_last_reason():
    queue = GpuQueue(recheck_interval=0.02)
    pool = FakeSlots(free=0)
    with pytest.raises(GpuWaitTimeout) as caught:
        await queue.acquire(
            "k", 10, pool.attempt_for("k"), user="u", timeout=0.1, abandon=pool.abandon
        )
    assert caught.value.decision is BUSY and "no free GPU slot" in str(caught.value)
    assert len(queue) == 0

    # A slot freed by someone else (no notify) is found by the periodic re-check.
    async def free_later():
        await asyncio.sleep(0.05)
        pool.free = 1

    asyncio.create_task(free_later())
    decision = await queue.acquire(
        "k2", 10, pool.attempt_for("k2"), user="u", timeout=2, abandon=None
    )
    assert decision.granted == ("k2",)


async def test_a_grant_that_arrives_after_giving_up_is_released():
    queue = GpuQueue(recheck_interval=60)
    pool = FakeSlots(free=1)
    started = asyncio.Event()

    async def slow_attempt() -> Decision:
        started.set()
        await asyncio.sleep(0.2)
        return await pool.attempt_for("slow")()

    task = asyncio.create_task(
        queue.acquire("slow", 10, slow_attempt, user="u", timeout=30, abandon=pool.abandon)
    )
    await started.wait()
    task.cancel()  # the hub cancelled the spawn while the allocator was deciding
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until_async(lambda: pool.released, 10, message="the late grant is released")
    assert pool.released == ["slow"] and pool.free == 1


@pytest.mark.parametrize(
    "options",
    [{"gpus": 1, "mig": "1g.10gb"}, {"gpus": 0, "mig": "1g.10gb"}, {"image": "x", "gpus": 2}],
)
def test_every_door_agrees_on_the_keys_and_on_gpus_or_mig(options):
    """The broker/CLI (actions.operations) and the hub (spawner.options) accept the same spawn
    options and refuse the same ones (ds01hub.spawn_options)."""
    from ds01hub.actions.operations import OperationError, spawn_options
    from ds01hub.spawn_options import SPAWN_OPTION_KEYS

    def accepted(check, error) -> bool:
        try:
            check(options)
        except error:
            return False
        return True

    both = accepted(spawn_options, OperationError)
    assert both == accepted(normalize_user_options, OptionsError)
    assert both == (not (options.get("gpus") and options.get("mig")))
    for key in SPAWN_OPTION_KEYS:  # a key one door knows, every door knows
        value = 1 if key == "gpus" else "1g.10gb" if key == "mig" else "x"
        value = True if key == "queue" else value
        assert spawn_options({key: value}) and normalize_user_options({key: value})


def test_the_offer_as_json_counts_what_the_form_counts():
    assert OFFER.to_dict() == {
        "whole": {"free": 1, "total": 2},
        "mig": {"2g.20gb": {"free": 2, "total": 2}},
        "simulated": True,
    }
