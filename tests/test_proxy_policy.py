"""The socket proxy's pure policy: request normalisation, routes, ownership and create checks."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace

import pytest
from harness.inspect_docs import TRUST
from hypothesis import given, settings
from hypothesis import strategies as st

from ds01hub import labels
from ds01hub.dockerproxy import build_context, policy
from ds01hub.dockerproxy.build_context import ContextError, image_uses
from ds01hub.dockerproxy.policy import (
    ContainerFacts,
    CreateFacts,
    Denied,
    ImageFacts,
    Invisible,
    Kind,
    MountFacts,
    PathFacts,
    Route,
    UserLimits,
    VolumeFacts,
)
from ds01hub.peer import Caller

ALICE = Caller(uid=1001, gid=1001, user="alice", home="/home/alice", groups=("alice",))
SETTINGS = policy.Settings(trust=TRUST)
ALICE_ID = "a" * 64
BOB_ID = "b" * 64


def facts(cid: str, user: str | None, binds: bool = False, managed: str = "true"):
    """A container as the proxy's look-up gives it: `user`'s if its labels were signed."""
    labels = {"ds01.managed": managed, "ds01.user": user} if user else {}
    owner = user if managed == "true" else None
    return ContainerFacts(id=cid, labels=labels, has_host_binds=binds, owner=owner)


def target(raw: str, method: str = "GET"):
    return policy.parse_target(method, raw)


def denied(call, *args, status: int = 403, **kwargs) -> str:
    with pytest.raises(Denied) as info:
        call(*args, **kwargs)
    assert info.value.status == status, info.value.message
    return info.value.message


# --------------------------------------------------------------------------- targets and routes


@pytest.mark.parametrize(
    "raw",
    [
        "/v1.41/containers/json",
        "/containers/json",
        "/v1.41//containers///json",
        "/v1.41/containers/./json",
        "/v1.41/images/../containers/json",
        "/v1.41/%63ontainers/json",
        "/v1.41/containers/json/",
    ],
)
def test_equivalent_spellings_normalise_to_one_route(raw):
    parsed = target(raw)
    assert parsed.segments == ("containers", "json")
    assert policy.classify(parsed) == Route(Kind.LIST_CONTAINERS)
    assert parsed.render().endswith("/containers/json")


def test_forwarded_target_is_rebuilt_from_the_decoded_form():
    parsed = target("/v1.41//containers/%61bc/json?size=1")
    assert parsed.render() == "/v1.41/containers/abc/json?size=1"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("/v1.41/../../etc", "climbs above the root"),
        ("http://docker/v1.41/containers/json", "absolute path"),
        ("/v1.41/containers/json#x", "absolute path"),
        ("/v1.41/containers/json?all=1;filters=x", "';'"),
        ("/v1.41/containers/%zz/json", "%-escape"),
        ("/v1.41/containers/%00/json", "control character"),
        ("/v1.41/containers/%C3%A9/json", "non-ASCII"),
    ],
)
def test_malformed_targets_are_refused(raw, why):
    assert why in denied(policy.parse_target, "GET", raw, status=400)


def test_encoded_slash_in_a_reference_changes_the_route_and_is_refused():
    # Docker routes on the decoded path, so must we: "x%2Fjson" is two segments
    parsed = target("/v1.41/containers/x%2Fstart/json", "POST")
    denied(policy.classify, parsed)


def test_old_api_versions_are_refused():
    # before 1.24 the engine accepted a HostConfig at start, bypassing the create checks
    assert "too old" in denied(policy.check_api_version, target("/v1.23/_ping"), status=400)
    policy.check_api_version(target("/v1.41/_ping"))
    policy.check_api_version(target("/_ping"))


def test_repeated_single_valued_parameter_is_refused():
    parsed = target("/containers/create?name=a&name=b", "POST")
    denied(parsed.param, "name", status=400)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/volumes"),
        ("POST", "/volumes/create"),
        ("GET", "/networks"),
        ("POST", "/networks/create"),
        ("POST", "/swarm/init"),
        ("GET", "/secrets"),
        ("GET", "/plugins"),
        ("POST", "/containers/x/update"),
        ("POST", "/commit?container=x"),
        ("POST", "/images/load"),
        ("POST", "/containers/prune"),
        ("GET", "/system/df"),
        ("POST", "/containers/x/copy"),
        ("PATCH", "/containers/x/json"),
        ("POST", "/images/x/push"),
        ("GET", "/exec/x/other"),
    ],
)
def test_unknown_endpoints_are_denied_by_default(method, path):
    assert "not available" in denied(policy.classify, target(path, method))


def test_routes_carry_the_reference_and_action():
    assert policy.classify(target("/containers/abc/logs")) == Route(Kind.CONTAINER, "logs", "abc")
    assert policy.classify(target("/containers/abc", "DELETE")) == Route(Kind.CONTAINER, "", "abc")
    assert policy.classify(target("/exec/e1/start", "POST")) == Route(Kind.EXEC, "start", "e1")
    assert policy.classify(target("/images/ds01-alice/x:1/json")) == Route(
        Kind.IMAGE_READ, "json", "ds01-alice/x:1"
    )


# --------------------------------------------------------------------------- ownership


def test_own_container_is_allowed_and_addressed_by_full_id():
    route = Route(Kind.CONTAINER, "stop", "web")
    checked, body = policy.check_container_action(
        ALICE, route, target("/v1.41/containers/web/stop", "POST"), facts(ALICE_ID, "alice"), b""
    )
    assert checked.render() == f"/v1.41/containers/{ALICE_ID}/stop"
    assert body is None


def test_other_users_container_reads_as_missing():
    route = Route(Kind.CONTAINER, "json", "x")
    message = denied(
        policy.check_container_action,
        ALICE,
        route,
        target("/containers/x/json"),
        facts(BOB_ID, "bob"),
        b"",
        status=404,
    )
    assert message == "No such container: x" and "bob" not in message


@pytest.mark.parametrize(
    "found", [None, facts(BOB_ID, None), facts(BOB_ID, "alice", managed="false")]
)
def test_missing_and_unmanaged_containers_are_invisible(found):
    route = Route(Kind.CONTAINER, "json", "x")
    message = denied(
        policy.check_container_action,
        ALICE,
        route,
        target("/containers/x/json"),
        found,
        b"",
        status=404,
    )
    assert message == "No such container: x"


def test_start_with_a_host_config_body_is_refused():
    route = Route(Kind.CONTAINER, "start", "x")
    body = json.dumps({"Privileged": True}).encode()
    message = denied(
        policy.check_container_action,
        ALICE,
        route,
        target("/containers/x/start", "POST"),
        facts(ALICE_ID, "alice"),
        body,
    )
    assert "must not carry" in message


@pytest.mark.parametrize("action", ["start", "restart"])
def test_a_gpu_container_is_started_only_through_the_allocator(action):
    """A stopped GPU container's hold may have expired and its slot gone to someone else: only
    ds01hub's own start (which checks the slot under the allocator's lock) may start it."""
    route = Route(Kind.CONTAINER, action, "x")
    gpu = ContainerFacts(id=ALICE_ID, labels={}, owner="alice", uses_gpus=True)
    message = denied(
        policy.check_container_action,
        ALICE,
        route,
        target(f"/containers/x/{action}", "POST"),
        gpu,
        b"",
    )
    assert "container-start" in message
    for allowed in ("stop", "kill", "pause", "unpause"):  # giving a GPU up is always fine
        checked, _ = policy.check_container_action(
            ALICE,
            Route(Kind.CONTAINER, allowed, "x"),
            target(f"/containers/x/{allowed}", "POST"),
            gpu,
            b"",
        )
        assert checked.render() == f"/containers/{ALICE_ID}/{allowed}"
    plain = facts(ALICE_ID, "alice")
    checked, _ = policy.check_container_action(
        ALICE, route, target(f"/containers/x/{action}", "POST"), plain, b""
    )
    assert checked.render() == f"/containers/{ALICE_ID}/{action}"


@pytest.mark.parametrize(
    ("host", "found", "expected"),
    [
        ({"DeviceRequests": [{"Driver": "nvidia", "DeviceIDs": ["GPU-1"]}]}, {}, True),
        ({}, {"ds01.gpus": "0"}, True),
        ({"DeviceRequests": None}, {"ds01.gpus": ""}, False),
    ],
)
def test_gpu_use_is_read_from_device_requests_and_labels(host, found, expected):
    data = {"Id": ALICE_ID, "Name": "/x", "Config": {"Labels": found}, "HostConfig": host}
    assert ContainerFacts.from_inspect(data, None).uses_gpus is expected


def test_copy_into_a_container_with_host_binds_is_refused():
    route = Route(Kind.CONTAINER, "archive", "x")
    put = target("/containers/x/archive?path=/", "PUT")
    assert "docker cp" in denied(
        policy.check_container_action, ALICE, route, put, facts(ALICE_ID, "alice", True), b""
    )
    checked, _ = policy.check_container_action(
        ALICE, route, put, facts(ALICE_ID, "alice", False), b""
    )
    assert checked.segments[1] == ALICE_ID


def test_removing_a_link_is_refused():
    route = Route(Kind.CONTAINER, "", "x")
    denied(
        policy.check_container_action,
        ALICE,
        route,
        target("/containers/x?link=1", "DELETE"),
        facts(ALICE_ID, "alice"),
        b"",
    )


def test_renaming_is_refused_because_the_signature_covers_the_name():
    route = Route(Kind.CONTAINER, "rename", "x")
    for name in ("default._.bob", "proj._.alice", "plain"):
        message = denied(
            policy.check_container_action,
            ALICE,
            route,
            target(f"/containers/x/rename?name={name}", "POST"),
            facts(ALICE_ID, "alice"),
            b"",
        )
        assert "renaming is not available" in message


@pytest.mark.parametrize(
    ("exec_body", "binds", "ok"),
    [
        ({"Cmd": ["true"], "Tty": True}, True, True),
        ({"Cmd": ["true"], "User": "1001"}, True, True),
        ({"Cmd": ["true"], "Privileged": True}, False, False),
        ({"Cmd": ["true"], "User": "root"}, True, False),
        ({"Cmd": ["true"], "User": "0:0"}, True, False),
        ({"Cmd": ["true"], "User": "root"}, False, True),
        ({"Cmd": ["true"], "user": "root"}, True, False),
    ],
)
def test_exec_create(exec_body, binds, ok):
    route = Route(Kind.CONTAINER, "exec", "x")
    call = (
        policy.check_container_action,
        ALICE,
        route,
        target("/containers/x/exec", "POST"),
        facts(ALICE_ID, "alice", binds),
        json.dumps(exec_body).encode(),
    )
    if ok:
        _, body = call[0](*call[1:])
        forwarded = json.loads(body)
        assert forwarded["Cmd"] == ["true"]
        if binds:  # whatever was asked, it runs as the caller
            assert forwarded["User"] == "1001:1001"
    else:
        denied(*call)


def test_container_list_adds_owner_filters_to_both_filter_forms():
    for raw in ['{"status":["running"]}', '{"status":{"running":true}}']:
        checked = policy.check_list(ALICE, target(f"/containers/json?filters={raw}"), SETTINGS)
        filters = json.loads(checked.param("filters"))
        assert filters["status"] == ["running"]
        assert set(filters["label"]) == {
            "ds01.managed=true",
            f"ds01.deployment={TRUST.deployment}",
            "ds01.user=alice",
            f"ds01.owner={TRUST.owner_tag('alice')}",
        }


def signed(user: str, name: str) -> dict:
    """The labels ds01hub gives `user`'s container `name`."""
    own = labels.container_labels(user=user, project=None, group=None, priority=0)
    return TRUST.sign(own, name)


def test_container_list_response_keeps_only_own_signed_containers():
    forged = dict(signed("alice", "other"))  # alice's signed labels, on another container
    listing = [
        {"Id": "1", "Names": ["/mine"], "Labels": signed("alice", "mine")},
        {"Id": "2", "Names": ["/bobs"], "Labels": signed("bob", "bobs")},
        {"Id": "3", "Names": ["/claims"], "Labels": {"ds01.managed": "true", "ds01.user": "alice"}},
        {"Id": "4", "Names": ["/copied"], "Labels": forged},
        {"Id": "5", "Names": ["/x"], "Labels": None},
        "not an object",
    ]
    owned = policy.filter_owned_containers(listing, "alice", TRUST)
    assert [c["Id"] for c in owned] == ["1"]


def test_events_are_limited_to_own_containers():
    checked = policy.check_events(ALICE, target("/events?filters={}"), SETTINGS)
    filters = json.loads(checked.param("filters"))
    assert filters["type"] == ["container"]
    assert "ds01.user=alice" in filters["label"]
    assert f"ds01.owner={TRUST.owner_tag('alice')}" in filters["label"]


def test_without_a_label_key_nothing_is_listed_or_created():
    assert "label key" in denied(
        policy.check_list, ALICE, target("/containers/json"), policy.Settings(), status=503
    )
    found = ContainerFacts.from_inspect(
        {"Id": "1", "Name": "/mine", "Config": {"Labels": signed("alice", "mine")}}, None
    )
    assert found.owner is None


# --------------------------------------------------------------------------- JSON strictness


def test_duplicate_keys_are_refused_even_in_different_case():
    denied(policy.parse_json_body, b'{"Image":"a","Image":"b"}', "create", status=400)
    denied(policy.parse_json_body, b'{"HostConfig":{},"hostconfig":{}}', "create", status=400)


# --------------------------------------------------------------------------- create


SHARED_IMAGE = ImageFacts("sha256:" + "5" * 64, ("busybox:latest",))


def create(
    body,
    *,
    paths=None,
    containers=None,
    limits=None,
    existing=0,
    name=None,
    volumes=None,
    image=SHARED_IMAGE,
    image_labels=None,
    shared=frozenset({SHARED_IMAGE.id}),
):
    # every path the check asks about resolves to itself unless a test says otherwise
    needs = policy.create_needs(ALICE, body, SETTINGS)
    containers = containers or {}
    imported, _ = policy.import_needs(body.get("HostConfig"), containers)
    devices = policy.volume_needs(volumes or {})
    paths = {p: PathFacts(p) for p in needs.paths + imported + devices} | (paths or {})
    if image_labels:
        image = ImageFacts(image.id, image.repo_tags, labels=image_labels)
    fact = CreateFacts(containers, paths, existing, limits, volumes or {}, image, shared)
    query = f"?name={name}" if name else ""
    checked, raw = policy.check_create(
        ALICE, target(f"/v1.41/containers/create{query}", "POST"), body, fact, SETTINGS
    )
    return json.loads(raw)


def base(**host) -> dict:
    return {"Image": "busybox", "Cmd": ["true"], "HostConfig": host}


def test_labels_are_signed_for_the_caller_and_reserved_ones_overwritten():
    body = base()
    body["Labels"] = {
        "ds01.user": "bob",
        "ds01.managed": "false",
        "ds01.gpus": "0",
        "ds01.priority": "100",
        "ds01.signature": "v1:forged",
        "ds01.project": "p",
        "aime.mlc.USER": "bob",
        "mine": "x",
    }
    found = create(body, name="web")["Labels"]
    assert found["ds01.user"] == "alice" and found["ds01.managed"] == "true"
    assert found["aime.mlc.USER"] == "alice"
    assert found["ds01.gpus"] == found["ds01.gpu_uuids"] == "" and found["ds01.priority"] == "0"
    assert found["ds01.project"] == "p" and found["mine"] == "x"
    assert found["ds01.image"] == "busybox"
    assert TRUST.verify(found, "web") and not TRUST.verify(found, "other")
    record = labels.ContainerRecord.from_docker(
        {"Id": "1", "Name": "/web", "Config": {"Labels": found}}, TRUST
    )
    assert record.user == "alice" and record.gpus == () and record.project == "p"


def test_every_reserved_label_of_the_image_is_set_so_none_is_merged_in():
    image_labels = {
        "ds01.gpus": "0",
        "ds01.priority": "100",
        "ds01.user": "victim",
        "ds01.signature": "v1:copied",
        "ds01.image.user": "victim",
        "aime.mlc.GPUS": "0",
        "org.opencontainers.image.title": "kept",
    }
    found = create(base(), name="web", image_labels=image_labels)["Labels"]
    for key in image_labels:
        if key.startswith(("ds01.", "aime.mlc.")):
            assert key in found, key  # set explicitly: the engine will not merge the image's
    assert found["ds01.gpus"] == "" and found["ds01.user"] == "alice"
    assert found["ds01.image.user"] == "" and "org.opencontainers.image.title" not in found
    assert TRUST.verify(found, "web")


def test_an_image_with_routing_labels_is_refused():
    message = denied(create, base(), image_labels={"traefik.http.routers.r.rule": "Host(`x`)"})
    assert "image busybox has label 'traefik.http.routers.r.rule'" in message


def test_a_create_without_a_name_gets_one_that_the_signature_covers():
    body = base()
    facts = CreateFacts(image=SHARED_IMAGE, shared_images=frozenset({SHARED_IMAGE.id}))
    checked, raw = policy.check_create(
        ALICE, target("/v1.41/containers/create", "POST"), body, facts, SETTINGS
    )
    name = checked.param("name")
    assert name.startswith("alice-") and len(name) == len("alice-") + 12
    assert TRUST.verify(json.loads(raw)["Labels"], name)
    again, _ = policy.check_create(
        ALICE, target("/v1.41/containers/create", "POST"), body, facts, SETTINGS
    )
    assert again.param("name") != name


def test_build_labels_may_not_be_reserved_or_routing():
    for key in ("ds01.user", "ds01.gpus", "aime.mlc.USER", "traefik.enable", "caddy"):
        raw = json.dumps({key: "x"})
        route = target(f"/build?t=ds01-alice/i&labels={raw}", "POST")
        assert "reserved to ds01hub" in denied(policy.check_build, ALICE, route, None)
    fine = target('/build?t=ds01-alice/i&labels={"org.example":"x"}', "POST")
    assert policy.check_build(ALICE, fine, None) == fine
    assert "not valid JSON" in denied(
        policy.check_build, ALICE, target("/build?labels={", "POST"), None, status=400
    )


def test_create_forces_no_new_privileges_and_hides_gpus():
    out = create(base(SecurityOpt=["no-new-privileges"]))
    assert out["HostConfig"]["SecurityOpt"] == ["no-new-privileges:true"]
    body = base()
    body["Env"] = ["NVIDIA_VISIBLE_DEVICES=all", "A=1"]
    assert create(body)["Env"] == ["A=1", "NVIDIA_VISIBLE_DEVICES=void"]


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ({"Privileged": True}, "privileged"),
        ({"CapAdd": ["SYS_ADMIN"]}, "capabilities"),
        ({"Devices": [{"PathOnHost": "/dev/sda"}]}, "devices"),
        ({"DeviceRequests": [{"Count": -1, "Capabilities": [["gpu"]]}]}, "container-create"),
        ({"PidMode": "host"}, "PidMode"),
        ({"IpcMode": "host"}, "IpcMode"),
        ({"NetworkMode": "host"}, "NetworkMode"),
        ({"UTSMode": "host"}, "UTSMode"),
        ({"UsernsMode": "host"}, "UsernsMode"),
        ({"CgroupnsMode": "host"}, "CgroupnsMode"),
        ({"SecurityOpt": ["seccomp=unconfined"]}, "security option"),
        ({"SecurityOpt": ["apparmor=unconfined"]}, "security option"),
        ({"SecurityOpt": ["label=disable"]}, "security option"),
        ({"Sysctls": {"net.ipv4.ip_forward": "1"}}, "sysctls"),
        ({"CgroupParent": "/"}, "cgroup parent"),
        ({"GroupAdd": ["0"]}, "groups"),
        ({"Runtime": "nvidia"}, "Runtime"),
        ({"LogConfig": {"Type": "syslog", "Config": {}}}, "LogConfig.Type"),
        ({"LogConfig": {"Type": "json-file", "Config": {"tag": "x"}}}, "log options"),
        ({"PortBindings": {"80/tcp": [{"HostPort": "80"}]}}, "reserved"),
        ({"MaskedPaths": ["/x"]}, "MaskedPaths"),
        ({"MaskedPaths": []}, "systempaths=unconfined"),
        ({"ReadonlyPaths": []}, "systempaths=unconfined"),
        ({"Ulimits": [{"Name": "nofile", "Soft": 1, "Hard": 1}]}, "ulimits"),
        ({"OomKillDisable": True}, "OOM"),
        ({"OomScoreAdj": -1000}, "OomScoreAdj"),
        ({"Binds": ["myvolume:/data"]}, "named volume"),
        ({"Binds": ["/etc:/x"]}, "must be inside"),
        ({"Binds": ["/home/alice:/x:rshared"]}, "bind option"),
        ({"Mounts": [{"Type": "bind", "Source": "/", "Target": "/h"}]}, "must be inside"),
        ({"Mounts": [{"Type": "volume", "Source": "v", "Target": "/v"}]}, "named volume"),
        (
            {
                "Mounts": [
                    {
                        "Type": "volume",
                        "Target": "/v",
                        "VolumeOptions": {
                            "DriverConfig": {
                                "Name": "local",
                                "Options": {"device": "/etc", "o": "bind"},
                            }
                        },
                    }
                ]
            },
            "DriverConfig",
        ),
        ({"Mounts": [{"Type": "npipe", "Source": "x", "Target": "/v"}]}, "Mounts.Type"),
        ({"Mounts": [{"type": "bind", "source": "/", "target": "/h"}]}, "Mounts.type"),
        ({"privileged": True}, "HostConfig.privileged"),
        ({"Annotations": {"a": "b"}}, "HostConfig.Annotations"),
        ({"VolumeDriver": "local-persist"}, "volume drivers"),
    ],
)
def test_dangerous_host_config_is_refused(host, why):
    assert why in denied(create, base(**host))


def test_host_config_fields_at_the_top_level_are_refused():
    # the engine reads HostConfig fields from the top level when "HostConfig" is absent
    for body in [
        {"Image": "x", "Privileged": True},
        {"Image": "x", "Binds": ["/:/h"]},
        {"Image": "x", "hostconfig": {"Privileged": True}},
    ]:
        assert "not allowed" in denied(create, body)


def test_empty_unknown_fields_are_dropped_not_forwarded():
    body = base(Annotations=None, Privileged=False, CapAdd=[])
    body["Memory"] = 0
    out = create(body)
    assert "Annotations" not in out["HostConfig"] and "Memory" not in out
    assert "Privileged" not in out["HostConfig"]


def test_binds_inside_home_are_forwarded_resolved_and_run_as_the_caller():
    paths = {"/home/alice/data": PathFacts("/home/alice/real")}
    out = create(base(Binds=["/home/alice/data:/data:ro", "/anon"]), paths=paths)
    assert out["HostConfig"]["Binds"] == ["/anon"]  # an anonymous volume stays
    assert out["HostConfig"]["Mounts"] == [
        {
            "Type": "bind",
            "Source": "/home/alice/real",
            "Target": "/data",
            "ReadOnly": True,
            "BindOptions": {"Propagation": "rprivate"},
        }
    ]
    assert out["User"] == "1001:1001"


@pytest.mark.parametrize("real", ["/home/alice/x:/y:rshared", "/home/alice/a,b", "/home/alice/:"])
def test_a_colon_or_comma_in_a_resolved_path_smuggles_no_option(real):
    """A symlink whose target has ':' once turned into a Binds string with an 'rshared'."""
    paths = {"/home/alice/link": PathFacts(real)}
    host = create(base(Binds=["/home/alice/link:/data"]), paths=paths)["HostConfig"]
    assert "Binds" not in host
    (mount,) = host["Mounts"]
    assert mount["Source"] == real and mount["BindOptions"] == {"Propagation": "rprivate"}


def test_mounts_of_type_bind_get_rprivate_propagation():
    mount = {"Type": "bind", "Source": "/home/alice/d", "Target": "/d"}
    mount["BindOptions"] = {"Propagation": "rslave", "NonRecursive": True}
    (out,) = create(base(Mounts=[mount]))["HostConfig"]["Mounts"]
    assert out["BindOptions"] == {"Propagation": "rprivate", "NonRecursive": True}


def test_a_symlink_out_of_home_is_refused_and_sockets_too():
    link = {"/home/alice/etc": PathFacts("/etc")}
    assert "must be inside" in denied(create, base(Binds=["/home/alice/etc:/x"]), paths=link)
    sock = {"/home/alice/d.sock": PathFacts("/home/alice/d.sock", is_socket=True)}
    assert "sockets" in denied(create, base(Binds=["/home/alice/d.sock:/x"]), paths=sock)


def test_a_prefix_of_home_is_not_inside_home():
    paths = {"/home/alice2/x": PathFacts("/home/alice2/x")}
    assert "must be inside" in denied(create, base(Binds=["/home/alice2/x:/x"]), paths=paths)


def test_with_binds_a_different_user_is_refused():
    paths = {"/home/alice/d": PathFacts("/home/alice/d")}
    body = base(Binds=["/home/alice/d:/d"])
    body["User"] = "0"
    assert "run as you" in denied(create, body, paths=paths)
    body["User"] = "1001:0"  # own uid, root's group: a set-gid file would give group root
    assert "run as you" in denied(create, body, paths=paths)


def test_without_binds_any_container_user_is_kept():
    body = base()
    body["User"] = "root"
    assert create(body)["User"] == "root"


def test_container_namespaces_and_volumes_from_must_be_own():
    containers = {
        "mine": facts(ALICE_ID, "alice"),
        "theirs": facts(BOB_ID, "bob"),
        "loose": facts("c" * 64, None),
    }
    out = create(
        base(NetworkMode="container:mine", IpcMode="container:mine", VolumesFrom=["mine:ro"]),
        containers=containers,
    )
    assert out["HostConfig"]["NetworkMode"] == f"container:{ALICE_ID}"
    assert out["HostConfig"]["IpcMode"] == f"container:{ALICE_ID}"
    assert "VolumesFrom" not in out["HostConfig"]  # replaced by the (checked) mounts
    for ref in ("theirs", "loose", "gone"):
        for host in [
            {"NetworkMode": f"container:{ref}"},
            {"IpcMode": f"container:{ref}"},
            {"PidMode": f"container:{ref}"},
            {"VolumesFrom": [ref]},
        ]:
            message = denied(create, base(**host), containers=containers, status=404)
            assert message == f"No such container: {ref}"  # whoever's it is


def test_a_shared_pid_namespace_runs_as_the_caller():
    """/proc/PID/root of a process in the other container reaches that container's binds."""
    containers = {"mine": facts(ALICE_ID, "alice")}
    out = create(base(PidMode="container:mine"), containers=containers)
    assert out["HostConfig"]["PidMode"] == f"container:{ALICE_ID}"
    assert out["User"] == "1001:1001"


HOME_BIND = MountFacts("bind", "/h", source="/home/alice", rw=True)
ANON = MountFacts("volume", "/anon", name="d" * 64, driver="local")


def with_mounts(*mounts: MountFacts) -> dict:
    return {"src": ContainerFacts(ALICE_ID, {}, True, mounts, owner="alice")}


@pytest.mark.parametrize("mode", ["", ":rw", ":ro"])
def test_volumes_from_imports_binds_as_checked_mounts_run_as_the_caller(mode):
    """The attack: --volumes-from a container that binds the home, as root: a setuid binary."""
    body = base(VolumesFrom=[f"src{mode}"])
    body["User"] = "0"
    assert "run as you" in denied(create, body, containers=with_mounts(HOME_BIND))
    volumes = {ANON.name: VolumeFacts(ANON.name, "local")}
    out = create(
        base(VolumesFrom=[f"src{mode}"]), containers=with_mounts(HOME_BIND, ANON), volumes=volumes
    )
    assert out["User"] == "1001:1001"
    bind, anon = out["HostConfig"]["Mounts"]
    assert bind["Type"] == "bind" and bind["Source"] == "/home/alice" and bind["Target"] == "/h"
    assert bind["ReadOnly"] is (mode == ":ro")
    assert bind["BindOptions"] == {"Propagation": "rprivate"}
    assert anon["Type"] == "volume" and anon["Source"] == "d" * 64


def test_volumes_from_cannot_make_a_read_only_mount_writable():
    ro = MountFacts("bind", "/h", source="/home/alice", rw=False)
    (mount,) = create(base(VolumesFrom=["src:rw"]), containers=with_mounts(ro))["HostConfig"][
        "Mounts"
    ]
    assert mount["ReadOnly"] is True


def test_volumes_from_only_anonymous_volumes_keeps_the_user():
    body = base(VolumesFrom=["src"])
    body["User"] = "root"
    volumes = {ANON.name: VolumeFacts(ANON.name, "local")}
    assert create(body, containers=with_mounts(ANON), volumes=volumes)["User"] == "root"


def test_volumes_from_an_import_outside_the_bind_roots_is_refused():
    etc = MountFacts("bind", "/x", source="/etc")
    assert "must be inside" in denied(
        create, base(VolumesFrom=["src"]), containers=with_mounts(etc)
    )
    # the source's bind now points elsewhere (a symlink swapped in): judged by where it points
    moved = {"/home/alice": PathFacts("/etc")}
    message = denied(
        create, base(VolumesFrom=["src"]), containers=with_mounts(HOME_BIND), paths=moved
    )
    assert "must be inside" in message


@pytest.mark.parametrize(
    ("volume", "why"),
    [
        (VolumeFacts("v", "local", {"o": "bind", "device": "/"}), "must be inside"),
        (VolumeFacts("v", "local", {"type": "nfs", "o": "addr=x"}), "not importable"),
        (VolumeFacts("v", "rexray"), "not importable"),
        (None, "volume"),
    ],
)
def test_volumes_from_judges_a_named_volume_by_what_it_is(volume, why):
    named = MountFacts("volume", "/v", name="v", driver="local")
    volumes = {"v": volume}
    message = denied(
        create, base(VolumesFrom=["src"]), containers=with_mounts(named), volumes=volumes
    )
    assert why in message


def test_volumes_from_a_bind_volume_of_home_is_a_host_bind():
    named = MountFacts("volume", "/v", name="v", driver="local")
    volumes = {
        "v": VolumeFacts("v", "local", {"o": "bind", "type": "none", "device": "/home/alice/w"})
    }
    out = create(base(VolumesFrom=["src"]), containers=with_mounts(named), volumes=volumes)
    (mount,) = out["HostConfig"]["Mounts"]
    assert mount["Type"] == "bind" and mount["Source"] == "/home/alice/w"
    assert out["User"] == "1001:1001"


def test_the_requests_own_mounts_win_a_destination_over_imported_ones():
    body = base(VolumesFrom=["src"], Binds=["/home/alice/d:/h"])
    (mount,) = create(body, containers=with_mounts(HOME_BIND))["HostConfig"]["Mounts"]
    assert mount["Source"] == "/home/alice/d"


def test_create_needs_lists_references_and_paths():
    body = base(
        NetworkMode="container:n",
        VolumesFrom=["v:ro"],
        Binds=["/a:/b", "vol:/c"],
        Mounts=[{"Type": "bind", "Source": "/m", "Target": "/m"}],
    )
    needs = policy.create_needs(ALICE, body, policy.Settings())
    assert needs.containers == ("n", "v")
    assert needs.paths == ("/a", "/m", "/home/alice", "/workspace/alice")


def test_a_root_directory_template_never_opens_the_whole_host():
    caller = Caller(uid=5, gid=5, user="svc", home="/", groups=())
    settings = policy.Settings(bind_roots=("{home}",))
    check = policy.CreateCheck(caller, settings, CreateFacts(paths={"/": PathFacts("/")}))
    assert check.roots == []


def test_networks_are_limited():
    body = base(NetworkMode="lab-net")
    assert "NetworkMode" in denied(create, body)
    body = base()
    body["NetworkingConfig"] = {"EndpointsConfig": {"hub-net": {}}}
    assert "network 'hub-net'" in denied(create, body)


def test_names_of_other_users_servers_are_refused():
    assert "reserved" in denied(create, base(), name="default._.bob")
    create(base(), name="default._.alice")


LIMITS = UserLimits(
    host_config={
        "Memory": 1 << 30,
        "MemorySwap": 1 << 30,
        "NanoCpus": 2 * 10**9,
        "PidsLimit": 100,
        "ShmSize": 64 << 20,
    },
    allowed_images=("busybox", "ds01-*"),
    max_containers=3,
)


def test_limits_cap_larger_requests_and_keep_smaller_ones():
    host = create(base(Memory=8 << 30, NanoCpus=10**9, MemorySwap=-1), limits=LIMITS)["HostConfig"]
    assert host["Memory"] == 1 << 30 and host["MemorySwap"] == 1 << 30
    assert host["NanoCpus"] == 10**9
    assert host["PidsLimit"] == 100 and host["ShmSize"] == 64 << 20


def test_cpu_quota_cannot_sidestep_a_cpu_limit():
    assert "--cpus" in denied(create, base(CpuQuota=400000, CpuPeriod=100000), limits=LIMITS)


def test_container_count_and_image_limits():
    assert "max_containers_per_user: 3" in denied(create, base(), limits=LIMITS, existing=3)
    body = base()
    body["Image"] = "evil/miner"
    assert "allowed images" in denied(create, body, limits=LIMITS)


def test_a_refusal_names_where_the_limit_came_from():
    sources = {"max_containers_per_user": "hub_groups.students", "allowed_images": "defaults"}
    limits = replace(LIMITS, sources=sources)
    message = denied(create, base(), limits=limits, existing=3)
    assert "(max_containers_per_user: 3 from hub_groups.students)" in message
    body = base()
    body["Image"] = "evil/miner"
    assert "(busybox, ds01-* from defaults)" in denied(create, body, limits=limits)


# --------------------------------------------------------------------------- images, builds


def test_build_rules():
    ok = policy.check_build(
        ALICE, target("/build?t=ds01-alice/x:1&networkmode=bridge", "POST"), LIMITS
    )
    assert ok.param("memory") == str(1 << 30) and ok.param("cpuquota") == "200000"
    for query, why in [
        ("t=ds01hub/singleuser:latest", "build tags"),
        ("t=ds01-alice/x&t=busybox", "build tags"),
        ("networkmode=host", "network"),
        ("remote=https://example.org/x.git", "remote"),
        ("version=2", "BuildKit"),
        ("pull=1", "pull"),
    ]:
        assert why in denied(policy.check_build, ALICE, target(f"/build?{query}", "POST"), None)


def test_image_tag_delete_and_pull_rules():
    policy.check_image_tag(ALICE, target("/images/x/tag?repo=ds01-alice/y&tag=1", "POST"))
    policy.check_image_tag(ALICE, target("/images/x/tag?repo=docker.io/ds01-alice/y&tag=1", "POST"))
    denied(policy.check_image_tag, ALICE, target("/images/x/tag?repo=evil.io/ds01-alice/y", "POST"))
    denied(policy.check_image_tag, ALICE, target("/images/x/tag?repo=busybox&tag=latest", "POST"))
    policy.check_image_delete(ALICE, Route(Kind.IMAGE_DELETE, "", "ds01-alice/y:1"))
    denied(policy.check_image_delete, ALICE, Route(Kind.IMAGE_DELETE, "", "busybox"))
    denied(policy.check_image_delete, ALICE, Route(Kind.IMAGE_DELETE, "", "sha256:" + "0" * 64))
    # whatever the reference (the route does not even read it): no answer depends on it
    assert "for admins" in denied(policy.check_pull, ALICE)


def test_map_fields_with_empty_values_are_kept():
    body = base()
    body["Volumes"] = {"/data": {}}
    body["ExposedPorts"] = {"80/tcp": {}}
    out = create(body)
    assert out["Volumes"] == {"/data": {}} and out["ExposedPorts"] == {"80/tcp": {}}


def test_inspecting_other_object_types_answers_not_found():
    # so that `docker inspect NAME` ends with "No such container" rather than a 403
    for path in ["/networks/abc", "/volumes/abc", "/plugins/abc/json", "/services/abc"]:
        assert "No such" in denied(policy.classify, target(path), status=404)


def test_reverse_proxy_routing_labels_are_refused():
    for label in ("traefik.http.routers.x.rule", "caddy", "caddy.reverse_proxy"):
        body = base()
        body["Labels"] = {label: "Host(`hub.example.org`)"}
        assert "routing labels" in denied(create, body)


def test_buildkit_refusals_say_how_to_build():
    for path in ("/session", "/grpc", "/v1.41/session"):
        assert "DOCKER_BUILDKIT=0" in denied(policy.classify, target(path, "POST"))


# --------------------------------------------------------------------------- nothing leaks


USERS = st.from_regex(r"[a-z][a-z0-9_-]{0,11}", fullmatch=True)
REFS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(caller=USERS, owner=USERS, ref=REFS, action=st.sampled_from(["json", "stop", "logs"]))
def test_another_users_container_is_refused_exactly_like_a_missing_one(caller, owner, ref, action):
    """For any two users and any reference: the refusal carries nothing about the owner."""
    if caller == owner:
        return
    me = Caller(uid=2000, gid=2000, user=caller, home=f"/home/{caller}")
    method = "GET" if action != "stop" else "POST"
    asked = target(f"/containers/{ref}/{action}", method)
    route = Route(Kind.CONTAINER, action, ref)

    def refusal(found):
        with pytest.raises(Invisible) as info:
            policy.check_container_action(me, route, asked, found, b"")
        return (info.value.status, info.value.message, info.value.kind, info.value.ref)

    missing = refusal(None)
    assert refusal(facts(BOB_ID, owner)) == missing
    assert refusal(facts(BOB_ID, owner, managed="false")) == missing
    assert missing[:2] == (404, f"No such container: {ref}")


ENGINE_MISSING = {
    # the engine's own texts for a missing object (20.10), as templates of the reference
    "container": '{{"message":"No such container: {0}"}}\n',
    "exec": '{{"message":"No such exec instance: {0}"}}\n',
}


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["container", "exec"]),
    ref=REFS,
    token=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
)
def test_a_stand_in_reads_back_as_the_reference(kind, ref, token):
    stand = policy.stand_in(kind, ref, token)
    assert stand.ref != ref
    engine = ENGINE_MISSING[kind].format(stand.ref).encode()
    assert stand.restore(engine) == ENGINE_MISSING[kind].format(ref).encode()


@pytest.mark.parametrize(
    ("ref", "engine_says"),
    [
        ("ds01-bob/secret", "No such image: ds01-bob/secret{m}:latest"),
        (
            "ds01-bob/secret:1",
            "no such image: ds01-bob/secret{m}:1: No such image: ds01-bob/secret{m}:1",
        ),
        ("3f2a9c", "No such image: 3f2a9c{m}:latest"),
        ("docker.io/library/foo", "No such image: foo{m}:latest"),
        ("localhost:5000/x/y:2", "No such image: localhost:5000/x/y{m}:2"),
        ("foo@sha256:" + "1" * 64, "No such image: foo{m}@sha256:" + "1" * 64),
    ],
)
def test_image_stand_ins_keep_the_shape_the_engine_reports(ref, engine_says):
    token = "ab" * 32
    stand = policy.stand_in("image", ref, token)
    mark = "zz" + token[:16]
    assert mark in stand.ref
    restored = stand.restore(engine_says.format(m=mark).encode()).decode()
    assert mark not in restored and restored == engine_says.format(m="")


@pytest.mark.parametrize("ref", ["3f" * 32, "sha256:" + "3f" * 32])
def test_an_image_id_stand_in_is_another_id(ref):
    token = "0123456789abcdef" * 4
    stand = policy.stand_in("image", ref, token)
    assert stand.ref == ref.replace("3f" * 32, token)
    said = f'{{"message":"No such image: sha256:{token}"}}'.encode()
    assert stand.restore(said) == f'{{"message":"No such image: sha256:{"3f" * 32}"}}'.encode()


OWN = [
    {"Id": "ab" + "0" * 62, "Names": ["/web"]},
    {"Id": "ac" + "1" * 62, "Names": ["/ab"]},
]


def test_references_resolve_among_the_callers_own_containers_only():
    assert policy.resolve_among("web", OWN) == "ab" + "0" * 62
    assert policy.resolve_among("ab", OWN) == "ac" + "1" * 62  # a name before a prefix
    assert policy.resolve_among("ac1", OWN) == "ac" + "1" * 62
    assert policy.resolve_among("bb", OWN) is None
    assert policy.resolve_among("", OWN) is None
    assert "multiple IDs" in denied(policy.resolve_among, "a", OWN, status=500)


def image(tags, cid="sha256:" + "7" * 64):
    return ImageFacts(cid, tuple(tags))


def test_images_visible_by_own_tag_or_shared_id_only():
    shared = frozenset({"sha256:" + "7" * 64})
    assert policy.image_visible(ALICE, image(["ds01-alice/x:1"], "sha256:1"), frozenset())
    assert policy.image_visible(ALICE, image(["docker.io/ds01-alice/x:1"], "sha256:1"), frozenset())
    assert not policy.image_visible(ALICE, image(["ds01-bob/x:1"], "sha256:1"), shared)
    assert not policy.image_visible(ALICE, image([], "sha256:1"), shared)
    assert not policy.image_visible(ALICE, image(["busybox:latest"], "sha256:1"), shared)
    assert policy.image_visible(ALICE, image(["anything:1"]), shared)
    assert not policy.image_visible(ALICE, None, shared)


def test_create_of_an_image_the_caller_may_not_use_reads_as_missing():
    for hidden in (image(["ds01-bob/secret:1"], "sha256:2"), None):
        body = base()
        body["Image"] = "ds01-bob/secret:1"
        with pytest.raises(Invisible) as info:
            create(body, image=hidden)
        assert info.value.kind == "image" and info.value.ref == "ds01-bob/secret:1"
        assert (
            info.value.body["Image"] == "ds01-bob/secret:1"
        )  # the checked request, for the stand-in
    body = base()
    body["Image"] = "ds01-alice/mine:1"
    assert create(body, image=image(["ds01-alice/mine:1"], "sha256:3"))["Image"] == body["Image"]


def test_listings_and_documents_hide_other_users_images_and_tags():
    shared = frozenset({"sha256:s"})
    listing = [
        {
            "Id": "sha256:s",
            "RepoTags": ["ds01hub/singleuser:latest", "ds01-bob/copy:1"],
            "RepoDigests": [],
        },
        {"Id": "sha256:b", "RepoTags": ["ds01-bob/secret:1"]},
        {"Id": "sha256:a", "RepoTags": ["ds01-alice/mine:1", "ds01-bob/same:1"]},
        {"Id": "sha256:n", "RepoTags": ["<none>:<none>"]},
    ]
    kept = policy.filter_image_list(ALICE, json.loads(json.dumps(listing)), shared)
    assert [i["Id"] for i in kept] == ["sha256:s", "sha256:a"]
    assert kept[0]["RepoTags"] == ["ds01hub/singleuser:latest"]
    assert kept[1]["RepoTags"] == ["ds01-alice/mine:1"]
    history = [{"Id": "x", "Tags": ["ds01-bob/copy:1"]}, {"Id": "y", "Tags": ["ds01-alice/m:1"]}]
    shown = policy.filter_image_history(ALICE, history)
    assert shown[0]["Tags"] is None and shown[1]["Tags"] == ["ds01-alice/m:1"]


def test_allowed_images_patterns_share_by_id_but_never_users_namespaces():
    listing = [
        {"Id": "sha256:j", "RepoTags": ["jupyter/scipy:1"]},
        {"Id": "sha256:b", "RepoTags": ["ds01-bob/x:1"]},
    ]
    assert policy.shared_by_pattern(listing, ["jupyter/*", "ds01-*"]) == {"sha256:j"}


def test_a_name_conflict_does_not_reveal_the_other_container():
    other = "e" * 64
    message = (
        f'Conflict. The container name "/web" is already in use by container "{other}". '
        "You have to remove (or rename) that container to be able to reuse that name."
    )
    redacted = policy.redact_conflict(message)
    assert other not in redacted and "already in use by another container" in redacted


def test_info_counts_only_the_callers_own():
    info = {"Containers": 50, "ContainersRunning": 40, "Images": 90, "Name": "host"}
    own = [{"State": "running"}, {"State": "exited"}, {"State": "paused"}, {"State": "created"}]
    shown = policy.own_info(info, own, 3)
    assert (shown["Containers"], shown["ContainersRunning"], shown["ContainersPaused"]) == (4, 1, 1)
    assert shown["ContainersStopped"] == 2 and shown["Images"] == 3


def test_docker_cp_out_of_a_container_with_binds_is_refused():
    for method in ("GET", "HEAD", "PUT"):
        route = Route(Kind.CONTAINER, "archive", "x")
        asked = target("/containers/x/archive?path=/h/f", method)
        message = denied(
            policy.check_container_action, ALICE, route, asked, facts(ALICE_ID, "alice", True), b""
        )
        assert "docker cp" in message


def test_named_volumes_and_shared_pid_namespaces_count_as_host_binds():
    data = {"Id": ALICE_ID, "Config": {"Labels": {}}, "HostConfig": {}, "Mounts": []}
    assert not ContainerFacts.from_inspect(data, TRUST).has_host_binds
    anon = {"Type": "volume", "Name": "f" * 64, "Driver": "local", "Destination": "/d"}
    assert not ContainerFacts.from_inspect(data | {"Mounts": [anon]}, TRUST).has_host_binds
    named = anon | {"Name": "jupyterhub-user-alice"}
    assert ContainerFacts.from_inspect(data | {"Mounts": [named]}, TRUST).has_host_binds
    shared_pid = data | {"HostConfig": {"PidMode": "container:" + BOB_ID}}
    assert ContainerFacts.from_inspect(shared_pid, TRUST).has_host_binds


# --------------------------------------------------------------------------- build contexts


def refs(text, build_args=None):
    return [use.reference for use in image_uses(text, build_args)]


def test_from_lines_stages_args_and_copy_from():
    text = (
        "# escape=\\\n"
        "ARG BASE=ds01-alice/base:1\n"
        "ARG OTHER\n"
        "FROM $BASE AS build\n"
        "RUN make \\\n"
        "    FROM nothing-this-is-a-run-argument\n"
        "FROM ${OTHER} AS run\n"
        "COPY --from=build /out /out\n"
        "COPY --from=0 /x /x\n"
        "COPY --chown=1:1 --from=ds01-alice/tools:1 /t /t\n"
        "FROM build\n"
        "FROM scratch\n"
    )
    assert refs(text, {"OTHER": "busybox:latest"}) == [
        "ds01-alice/base:1",
        "busybox:latest",
        "ds01-alice/tools:1",
    ]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("FROM \\\n  evil\n", "single line"),
        ("FROM --platform=linux/arm64 busybox\n", "flags"),
        ('FROM "evil"\n', "plainly"),
        ("FROM ev\\il\n", "plainly"),
        ("ARG X\nFROM ${X:-evil}\n", "plainly"),
        ("FROM $UNDECLARED\n", "declared"),
        ("FROM a\n# escape=`\n", "first line"),
        ("# escape=x\nFROM a\n", "escape"),
        ("FROM a\nCOPY --from='evil' / /\n", "plainly"),
        ("FROM a\nCOPY --from=$X / /\n", "plainly"),
        ("FROM a\nRUN x \\\n  # comment ends it for one parser\nFROM evil\n", "first column"),
        ("FROM a\x0bb\n", "U+000B"),
        ("FROM a b\n", "FROM image"),
        ("FROM\n", "FROM image"),
        ("ARG A=1 B=2\nFROM a\n", "plainly"),
    ],
)
def test_ambiguous_dockerfiles_are_refused(text, why):
    with pytest.raises(ContextError) as info:
        image_uses(text, {})
    assert why in str(info.value)


def test_from_split_by_continuations_in_every_reading():
    # the flag split over lines (with or without indentation): the image is still seen
    for text in (
        "FROM a\nCOPY --fr\\\nom=evil / /\n",
        "FROM a\nCOPY --fr\\\n   om=evil / /\n",
        "FROM a\nCOPY \\\n#c\n  --from=evil / /\n",
        "FROM a\nONBUILD COPY --from=evil / /\n",
    ):
        assert "evil" in refs(text), text


def test_a_later_stage_name_is_not_a_stage_yet_and_onbuild_names_images():
    assert refs("FROM ubuntu AS x\nCOPY --from=later / /\nFROM a AS later\n") == [
        "ubuntu",
        "later",
        "a",
    ]
    assert build_context.onbuild_uses(["COPY --from=0 / /", "RUN x"], "base")[0].reference == "0"


# a small model of the engine's reading: instructions are either FROM lines (with an image or
# a stage) or RUN lines continued over several physical lines, with comments in between
NAMES = st.from_regex(r"[a-z][a-z0-9]{0,8}(/[a-z0-9]{1,8})?(:[a-z0-9.]{1,5})?", fullmatch=True)


@st.composite
def dockerfiles(draw):
    lines, expected, stages = [], [], []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["from", "run", "comment", "blank"]))
        if kind == "from":
            name = draw(NAMES)
            stage = draw(st.one_of(st.none(), st.from_regex(r"s[0-9]", fullmatch=True)))
            if name not in stages:
                expected.append(name)
            lines.append(
                f"{draw(st.sampled_from(['FROM', 'from', 'From']))} {name}"
                + (f" AS {stage}" if stage else "")
            )
            if stage:
                stages.append(stage)
        elif kind == "run":
            middle = st.sampled_from(["echo x", "FROM fake", "# a comment line", "--from=y"])
            last = st.sampled_from(["echo x", "FROM fake", "--from=y"])
            parts = draw(st.lists(middle, max_size=3)) + [draw(last)]
            body = " \\\n".join(parts)
            lines.append(f"RUN {body}")
        elif kind == "comment":
            lines.append("# FROM commented-out")
        else:
            lines.append("")
    return "\n".join(lines) + "\n", expected


@settings(max_examples=300, deadline=None)
@given(dockerfiles())
def test_every_from_the_engine_would_run_is_reported(case):
    text, expected = case
    assert set(refs(text)) == set(expected)


def tar(entries) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, data
                archive.addfile(info)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def dockerfile(entries, name=None, compress=None) -> str:
    data = tar(entries)
    if compress:
        data = compress(data)
    return build_context.dockerfile_from_context(data, name, 1 << 20)


def test_the_dockerfile_the_engine_would_read():
    import bz2
    import gzip
    import lzma

    assert dockerfile([("Dockerfile", "f", b"FROM a")]) == "FROM a"
    assert (
        dockerfile([("Dockerfile", "f", b"FROM a"), ("./Dockerfile", "f", b"FROM b")]) == "FROM b"
    )
    assert dockerfile([("dockerfile", "f", b"FROM lower")]) == "FROM lower"
    assert dockerfile([("sub", "dir", b""), ("sub/D.x", "f", b"FROM s")], "sub/D.x") == "FROM s"
    assert dockerfile([(".dockerfile.1", "f", b"FROM o")], ".dockerfile.1") == "FROM o"
    for compress in (gzip.compress, bz2.compress, lzma.compress):
        assert dockerfile([("Dockerfile", "f", b"FROM z")], compress=compress) == "FROM z"


@pytest.mark.parametrize(
    ("entries", "name", "why"),
    [
        ([("d", "sym", "."), ("d/Dockerfile", "f", b"FROM evil")], None, "below a symbolic link"),
        ([("Dockerfile", "sym", "evil")], None, "regular file"),
        ([("Dockerfile", "dir", b"")], None, "regular file"),
        ([("x", "f", b"")], None, "has no Dockerfile"),
        ([("../Dockerfile", "f", b"FROM e")], None, "climbs out"),
        ([("s", "sym", "t"), ("t", "dir", b""), ("t/D", "f", b"FROM e")], "s/D", "symbolic link"),
        ([("Dockerfile", "f", b"FROM \xff")], None, "UTF-8"),
    ],
)
def test_contexts_that_could_be_read_two_ways_are_refused(entries, name, why):
    with pytest.raises(ContextError) as info:
        dockerfile(entries, name)
    assert why in str(info.value)


def test_a_context_that_is_no_tar_or_a_bomb_is_refused():
    import gzip

    with pytest.raises(ContextError):
        build_context.dockerfile_from_context(b"\x1f\x8b\x08garbage", None, 1 << 20)
    bomb = gzip.compress(tar([("Dockerfile", "f", b"FROM a"), ("zeros", "f", bytes(1 << 22))]))
    with pytest.raises(ContextError) as info:
        build_context.dockerfile_from_context(bomb, None, 1 << 16)
    assert "too much" in str(info.value)


def test_build_images_reads_context_build_args_and_cache_from():
    context = tar([("Dockerfile", "f", b"ARG B\nFROM $B\n")])
    asked = target('/build?buildargs={"B":"ds01-bob/x:1"}&cachefrom=["ds01-bob/c:1"]', "POST")
    uses = policy.build_images(asked, context, 1 << 20)
    assert [u.reference for u in uses] == ["ds01-bob/x:1", "ds01-bob/c:1"]
    message = denied(
        policy.check_build_image, ALICE, uses[0], image(["ds01-bob/x:1"], "sha256:9"), frozenset()
    )
    assert "no image 'ds01-bob/x:1' that you may use" in message
    missing = denied(policy.check_build_image, ALICE, uses[0], None, frozenset())
    assert missing == message  # the same words whether it exists or not
    base_with_trigger = ImageFacts(
        "sha256:" + "7" * 64, ("ds01-alice/b:1",), ("COPY --from=ds01-bob/x / /",)
    )
    (trigger,) = policy.check_build_image(ALICE, uses[0], base_with_trigger, frozenset())
    assert trigger.reference == "ds01-bob/x"


def test_an_image_found_by_id_is_forwarded_as_its_full_id():
    own = image(["ds01-alice/x:1"], "sha256:" + "8" * 64)
    for ref, forwarded in [
        ("888888", own.id),
        ("sha256:" + "8" * 64, own.id),
        ("ds01-alice/x:1", "ds01-alice/x:1"),
        ("docker.io/ds01-alice/x:1", "docker.io/ds01-alice/x:1"),
    ]:
        body = base()
        body["Image"] = ref
        assert create(body, image=own)["Image"] == forwarded


def test_builds_use_only_the_callers_images_as_cache():
    asked = target("/build?t=ds01-alice/x&cachefrom=%5B%22ds01-bob%2Fx%22%5D", "POST")
    limited = policy.build_cache_sources(asked, ["sha256:1", "sha256:1", "sha256:2"])
    assert json.loads(limited.param("cachefrom")) == ["sha256:1", "sha256:2", "scratch"]
