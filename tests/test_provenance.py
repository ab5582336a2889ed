"""Label provenance: the signature over a container's name and ds01 labels, the label key and
the deployment id in the state directory, and what a deployment's readers then believe."""

from __future__ import annotations

import multiprocessing
import os
import stat
from datetime import UTC, datetime

import pytest
from harness.inspect_docs import TRUST
from hypothesis import assume, given
from hypothesis import strategies as st

from ds01hub import labels, paths, provenance
from ds01hub.gpu.allocator import GpuAllocator
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.labels import SIGNATURE, SIGNED_KEYS, ContainerRecord
from ds01hub.limits import SimulatedGpuSpec, parse_limits
from ds01hub.provenance import Provenance, ProvenanceError

OTHER = Provenance("other-hub", bytes(range(1, 33)))
SAME_ID_OTHER_KEY = Provenance(TRUST.deployment, bytes(range(2, 34)))
CREATED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def real_labels(user: str = "alice", gpus=("0",), trust: Provenance = TRUST, name="p._.alice"):
    own = labels.container_labels(
        user=user,
        project="p",
        group="students",
        priority=10,
        gpus=gpus,
        gpu_uuids=[f"GPU-{g}" for g in gpus],
        image="img",
        created_at=CREATED,
    )
    return trust.sign(own, name)


# -- the signature --------------------------------------------------------------------------------


def test_a_signed_set_verifies_for_its_name_and_deployment_only():
    signed = real_labels()
    assert TRUST.verify(signed, "p._.alice") and TRUST.verify(signed, "/p._.alice")
    assert not TRUST.verify(signed, "q._.alice")  # copied onto another container
    assert not OTHER.verify(signed, "p._.alice")  # another deployment
    assert not SAME_ID_OTHER_KEY.verify(signed, "p._.alice")  # same id, another key
    assert signed[labels.DEPLOYMENT] == TRUST.deployment
    assert signed[labels.OWNER] == TRUST.owner_tag("alice") != OTHER.owner_tag("alice")
    assert set(SIGNED_KEYS) | {SIGNATURE} == set(signed)


@pytest.mark.parametrize("key", SIGNED_KEYS)
def test_changing_or_removing_any_signed_field_breaks_the_signature(key):
    signed = real_labels()
    assert not TRUST.verify(signed | {key: signed[key] + "x"}, "p._.alice")
    assert not TRUST.verify({k: v for k, v in signed.items() if k != key}, "p._.alice")


def test_unsigned_labels_do_not_matter_and_a_missing_user_never_verifies():
    signed = real_labels()
    assert TRUST.verify(signed | {"ds01.test": "1", "ds01.image.user": "x"}, "p._.alice")
    nobody = TRUST.sign({labels.MANAGED: "true"}, "c")
    assert nobody[labels.USER] == "" and not TRUST.verify(nobody, "c")
    assert not TRUST.verify(None, "c") and not TRUST.verify({}, "c")


fields = st.fixed_dictionaries(
    {
        key: st.text(max_size=12)
        for key in SIGNED_KEYS
        if key not in (labels.DEPLOYMENT, labels.OWNER)
    }
).filter(lambda f: f[labels.USER] != "")
names = st.text(min_size=1, max_size=20).filter(lambda n: n.removeprefix("/"))


@given(
    found=st.dictionaries(
        st.sampled_from([*SIGNED_KEYS, SIGNATURE, "ds01.other", "traefik.x"]),
        st.text(max_size=70),
    ),
    name=names,
)
def test_labels_written_without_the_key_never_verify(found, name):
    """What an attacker can put in an image or a Dockerfile: any labels at all, the current
    deployment id included (it is no secret)."""
    found[labels.DEPLOYMENT] = TRUST.deployment
    assert not TRUST.verify(found, name)


@given(values=fields, name=names, other=names, key=st.sampled_from(SIGNED_KEYS), new=st.text())
def test_a_genuine_set_only_verifies_unchanged_on_its_own_container(values, name, other, key, new):
    """What an attacker can copy: a label set ds01hub signed (their own container's). Onto any
    other name, or with any one field changed, it is worthless."""
    signed = TRUST.sign(values, name)
    assert TRUST.verify(signed, name)
    if other.removeprefix("/") != name.removeprefix("/"):
        assert not TRUST.verify(signed, other)
    assume(signed[key] != new)
    assert not TRUST.verify(signed | {key: new}, name)


# -- the key and the deployment id in the state directory -----------------------------------------


def test_key_and_deployment_are_created_once_with_safe_modes(tmp_path):
    first = provenance.load(tmp_path / "state")
    key_file = tmp_path / "state" / provenance.KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(first.key) == 32 and provenance.DEPLOYMENT_RE.match(first.deployment)
    assert provenance.load(tmp_path / "state") == first  # read back, not made anew
    assert provenance.load(tmp_path / "other") != first  # another state dir: another hub
    assert "key=" not in repr(first) and first.key.hex() not in repr(first)


def test_an_admin_may_name_the_deployment(tmp_path):
    (tmp_path / provenance.DEPLOYMENT_FILE).write_text("lab-gpu01\n")
    assert provenance.load(tmp_path).deployment == "lab-gpu01"


def _load_in_child(state_dir, results):
    found = provenance.load(state_dir)
    results.put((found.deployment, found.key.hex()))


def test_processes_starting_together_agree_on_one_key(tmp_path):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_load_in_child, args=(tmp_path, results)) for _ in range(6)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert len({results.get(timeout=5) for _ in children}) == 1
    assert sorted(os.listdir(tmp_path)) == [provenance.DEPLOYMENT_FILE, provenance.KEY_FILE]


def key_file(mode: int, text: str = "ab" * 32):
    def setup(directory):
        (directory / provenance.KEY_FILE).write_text(text)
        (directory / provenance.KEY_FILE).chmod(mode)

    return setup


def linked_key(directory):
    (directory / "elsewhere").write_text("ab" * 32)
    (directory / provenance.KEY_FILE).symlink_to("elsewhere")


def deployment_file(text: str):
    return lambda directory: (directory / provenance.DEPLOYMENT_FILE).write_text(text)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (key_file(0o644), "readable by others"),
        (key_file(0o600, "not hex"), "64 hex digits"),
        (linked_key, "not a link"),
        (deployment_file("bad id with spaces"), "deployment id"),
        (deployment_file(""), "deployment id"),
    ],
)
def test_unusable_files_are_named_with_the_fix(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(ProvenanceError, match=message):
        provenance.load(tmp_path)


def test_managed_services_inherit_the_hubs_state_directory(monkeypatch):
    monkeypatch.setenv(paths.ENV_STATE_DIR, "/srv/ds01")
    assert provenance.service_environment({"A": "1"}) == {
        "DS01HUB_STATE_DIR": "/srv/ds01",
        "A": "1",
    }
    explicit = {"DS01HUB_STATE_DIR": "/elsewhere"}
    assert provenance.service_environment(explicit) == explicit  # what the admin says wins
    monkeypatch.delenv(paths.ENV_STATE_DIR)
    assert provenance.service_environment() == {}


# -- what a deployment's readers believe ----------------------------------------------------------


def doc(name: str, found: dict) -> dict:
    state = {"Status": "running", "FinishedAt": "0001-01-01T00:00:00Z"}
    return {"Id": f"id-{name}", "Name": f"/{name}", "Config": {"Labels": found}, "State": state}


def allocator_of(trust: Provenance, docs: list[dict], tmp_path) -> GpuAllocator:
    nvml = SimulatedNvml([SimulatedGpuSpec(), SimulatedGpuSpec()])
    nvml.nvmlInit()
    return GpuAllocator(
        None,
        discover(nvml, simulated=True),
        tmp_path / trust.deployment,
        limits=parse_limits({"defaults": {"gpu_hold_after_stop": "1h"}}),
        container_lister=lambda: list(docs),
        trust=trust,
    )


def test_each_deployment_counts_only_its_own_signed_containers(tmp_path):
    claims = {labels.MANAGED: "true", labels.USER: "victim", labels.GPUS: "1"}
    docs = [
        doc("mine", real_labels("alice", ("0",), TRUST, "mine")),
        doc("theirs", real_labels("bob", ("1",), OTHER, "theirs")),
        doc("step", claims | {labels.DEPLOYMENT: TRUST.deployment}),  # a build step's claims
        doc("copy", real_labels("alice", ("1",), TRUST, "elsewhere")),  # copied signed set
        doc("rekeyed", real_labels("carol", ("1",), SAME_ID_OTHER_KEY, "rekeyed")),
    ]
    ours, theirs = allocator_of(TRUST, docs, tmp_path), allocator_of(OTHER, docs, tmp_path)
    assert [(h.slot_id, h.user) for h in ours.holdings()] == [("0", "alice")]
    assert [(h.slot_id, h.user) for h in theirs.holdings()] == [("1", "bob")]
    assert [r.name for r in ours.records()] == ["mine"]
    assert [r.name for r in theirs.records()] == ["theirs"]
    # the admin view still shows what each container claims, marked by deployment
    claimed = {d["Name"]: ContainerRecord.claimed(d) for d in docs}
    assert claimed["/step"].user == "victim" and claimed["/theirs"].deployment == "other-hub"
    assert ContainerRecord.from_docker(docs[2], TRUST) is None
