"""The socket proxy's pure policy: request normalisation, routes, ownership and create checks."""

from __future__ import annotations

import json

import pytest
from inspect_docs import TRUST

from ds01hub import labels
from ds01hub import proxy_policy as policy
from ds01hub.proxy_policy import (
    Caller,
    ContainerFacts,
    CreateFacts,
    Denied,
    Kind,
    PathFacts,
    Route,
    UserLimits,
)

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


def test_other_users_container_names_the_owner():
    route = Route(Kind.CONTAINER, "json", "x")
    message = denied(
        policy.check_container_action,
        ALICE,
        route,
        target("/containers/x/json"),
        facts(BOB_ID, "bob"),
        b"",
    )
    assert message == "Permission denied: container owned by bob"


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


def create(
    body, *, paths=None, containers=None, limits=None, existing=0, name=None, image_labels=None
):
    # every path the check asks about resolves to itself unless a test says otherwise
    needs = policy.create_needs(ALICE, body, SETTINGS)
    paths = {p: PathFacts(p) for p in needs.paths} | (paths or {})
    fact = CreateFacts(containers or {}, paths, existing, limits, image_labels or {})
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
    checked, raw = policy.check_create(
        ALICE, target("/v1.41/containers/create", "POST"), body, CreateFacts(), SETTINGS
    )
    name = checked.param("name")
    assert name.startswith("alice-") and len(name) == len("alice-") + 12
    assert TRUST.verify(json.loads(raw)["Labels"], name)
    again, _ = policy.check_create(
        ALICE, target("/v1.41/containers/create", "POST"), body, CreateFacts(), SETTINGS
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
    paths = {"/home/alice/data": PathFacts("/home/alice/data")}
    out = create(base(Binds=["/home/alice/data:/data:ro"]), paths=paths)
    assert out["HostConfig"]["Binds"] == ["/home/alice/data:/data:ro"]
    assert out["User"] == "1001:1001"


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
        base(NetworkMode="container:mine", PidMode="container:mine", VolumesFrom=["mine:ro"]),
        containers=containers,
    )
    assert out["HostConfig"]["NetworkMode"] == f"container:{ALICE_ID}"
    assert out["HostConfig"]["PidMode"] == f"container:{ALICE_ID}"
    assert out["HostConfig"]["VolumesFrom"] == [f"{ALICE_ID}:ro"]
    for host in [
        {"NetworkMode": "container:theirs"},
        {"IpcMode": "container:theirs"},
        {"VolumesFrom": ["theirs"]},
    ]:
        assert "owned by bob" in denied(create, base(**host), containers=containers)
    denied(create, base(VolumesFrom=["loose"]), containers=containers, status=404)


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
    assert "limit 3" in denied(create, base(), limits=LIMITS, existing=3)
    body = base()
    body["Image"] = "evil/miner"
    assert "allowed images" in denied(create, body, limits=LIMITS)


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
    pull = target("/images/create?fromImage=busybox&tag=latest", "POST")
    assert policy.pull_reference(pull) == "busybox:latest"
    assert "already exists" in denied(policy.check_pull, ALICE, "busybox:latest", True)
    policy.check_pull(ALICE, "busybox:latest", False)
    all_tags = target("/images/create?fromImage=busybox", "POST")
    assert "all tags" in denied(policy.pull_reference, all_tags)
    imported = target("/images/create?fromSrc=-&repo=busybox", "POST")
    assert "import" in denied(policy.pull_reference, imported)


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
