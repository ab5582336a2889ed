"""The nodes file (node -> engine endpoint + TLS directory) and the swarm's container edge,
without a swarm: what is accepted, what is refused and how it is named; which container the
manager's word leads to. The real thing: tests/test_swarm_cli.py, tests/test_swarm_tls.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds01hub.actions.engines import Gone, SwarmContainers, with_container_fields
from ds01hub.bodies import BodyError
from ds01hub.gpu.swarm_nodes import (
    NodeEndpoint,
    NodeEngineError,
    NodeEngines,
    load_node_endpoints,
    parse_node_endpoints,
)


def test_tcp_with_a_tls_directory_and_unix_without():
    found = parse_node_endpoints(
        {
            "nodes": {
                "node2": {"url": "tcp://10.0.0.2:2376", "tls": "/etc/ds01hub/swarm-tls/client"},
                "node3": {"url": "unix:///run/node3/docker.sock"},
            }
        }
    )
    assert found["node2"].address == ("10.0.0.2", 2376)
    assert str(found["node2"].tls) == "/etc/ds01hub/swarm-tls/client"
    assert found["node3"].address == "/run/node3/docker.sock" and found["node3"].tls is None


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"url": "tcp://10.0.0.2:2376"}, "only with mutual TLS"),
        ({"url": "http://10.0.0.2:2375", "tls": "/d"}, "neither tcp://ADDR:PORT nor unix"),
        ({"url": "tcp://10.0.0.2:99999", "tls": "/d"}, "bad port"),
        ({"url": "unix://relative/sock"}, "not unix:///ABSOLUTE/PATH"),
    ],
)
def test_an_endpoint_that_is_not_safe_or_not_clear_is_refused_by_node(entry, words):
    with pytest.raises(NodeEngineError) as refused:
        parse_node_endpoints({"nodes": {"node2": entry}})
    assert "node2" in refused.value.message and words in refused.value.message


def test_unknown_keys_are_named():
    with pytest.raises(BodyError) as refused:
        parse_node_endpoints({"nodes": {"node2": {"url": "unix:///s", "cert": "/d"}}})
    assert "cert" in refused.value.message


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=12,
)
URLS = st.sampled_from(["tcp://a:1", "tcp://a", "unix:///s", "unix://s", "tcp://:5", "ssh://a"])
NEAR = st.fixed_dictionaries(
    {
        "nodes": st.dictionaries(
            st.text(max_size=8),
            st.dictionaries(st.sampled_from(["url", "tls", "other"]), URLS | JSON, max_size=3),
            max_size=3,
        )
    }
)


@given(JSON | NEAR)
def test_any_shape_is_read_or_refused_by_name(data):
    try:
        parse_node_endpoints(data)
    except (BodyError, NodeEngineError) as e:
        assert e.message


def test_the_file_is_read_strictly(tmp_path):
    path = tmp_path / "nodes.yaml"
    path.write_text("nodes:\n  node2: {url: 'unix:///a'}\n  node2: {url: 'unix:///b'}\n")
    with pytest.raises(NodeEngineError) as refused:
        load_node_endpoints(path)
    assert str(path) in refused.value.message and "node2" in refused.value.message
    with pytest.raises(NodeEngineError, match="cannot read"):
        load_node_endpoints(tmp_path / "missing.yaml")


def test_a_node_not_in_the_file_and_a_missing_certificate_are_named(tmp_path):
    engines = NodeEngines({"node2": NodeEndpoint("node2", "tcp://10.0.0.2:2376", tmp_path)})
    with pytest.raises(NodeEngineError) as unknown:
        engines.client("node4")
    assert "'node4'" in unknown.value.message and unknown.value.status == 503
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(NodeEngineError) as missing:
        engines.client("node2")
    assert f"{tmp_path / 'cert.pem'} is missing" in missing.value.message
    assert "swarm-tls client" in missing.value.hint


SERVICE = {
    "ID": "svc1",
    "CreatedAt": "2026-01-01T00:00:00Z",
    "Spec": {
        "Name": "thesis--ann",
        "Labels": {"ds01.user": "ann"},
        "Mode": {"Replicated": {"Replicas": 1}},
        "TaskTemplate": {
            "ContainerSpec": {"Image": "img", "User": "1000", "Dir": "/workspace"},
            "Resources": {"Limits": {"NanoCPUs": 2_000_000_000, "MemoryBytes": 1 << 30}},
        },
    },
}


def task(state, container="c" * 64, when="2026-01-01T00:00:01Z"):
    return {
        "ServiceID": "svc1",
        "NodeID": "n3",
        "Status": {
            "State": state,
            "Timestamp": when,
            "ContainerStatus": {"ContainerID": container},
        },
    }


class Api:
    """The manager's (and a node's) calls, answered from lists."""

    def __init__(self, tasks):
        self._tasks = tasks
        self.calls: list[tuple] = []

    def services(self, filters):
        return [SERVICE]

    def inspect_service(self, service_id):
        return SERVICE

    def tasks(self, filters=None):
        return self._tasks

    def nodes(self):
        return [{"ID": "n3", "Description": {"Hostname": "node3"}, "Status": {"State": "ready"}}]

    def inspect_node(self, node_id):
        return self.nodes()[0]

    def exec_create(self, container, command, **options):
        self.calls.append(("exec_create", container))
        return {"Id": "e1"}

    def exec_inspect(self, exec_id):
        return {"ContainerID": "c" * 64, "Running": False, "ExitCode": 3}


class Engines:
    def __init__(self, node_api):
        self.api = node_api

    def client(self, hostname):
        assert hostname == "node3"
        return SimpleNamespace(api=self.api)


def test_a_service_reads_as_its_container_with_the_limits_of_its_spec():
    manager = SimpleNamespace(api=Api([task("running")]))
    swarm = SwarmContainers(manager, Engines(None))
    (entry,) = swarm.summaries(["ds01.managed=true"])
    assert entry["State"] == "running" and entry["Labels"] == {"ds01.user": "ann"}
    assert entry["Names"] == ["/thesis--ann"] and entry["Id"] == "svc1"
    document = swarm.inspect("svc1")
    assert document["HostConfig"]["NanoCpus"] == 2_000_000_000
    assert document["Config"]["User"] == "1000" and document["Config"]["WorkingDir"] == "/workspace"
    assert with_container_fields(document, SERVICE)["HostConfig"]["Memory"] == 1 << 30


def test_exec_goes_to_the_container_the_manager_names_and_answers_for_the_service():
    node = Api([])
    old = task("shutdown", container="o" * 64, when="2026-01-01T00:00:00Z")
    swarm = SwarmContainers(SimpleNamespace(api=Api([old, task("running")])), Engines(node))
    assert swarm.exec_create("svc1", ["sh"]) == "e1"
    assert node.calls == [("exec_create", "c" * 64)]
    assert swarm.exec_inspect("e1")["ContainerID"] == "svc1"
    with pytest.raises(Gone):
        swarm.exec_inspect("not-ours")


def test_a_service_without_a_running_task_is_gone_for_its_inside():
    swarm = SwarmContainers(SimpleNamespace(api=Api([task("shutdown")])), Engines(None))
    with pytest.raises(Gone) as gone:
        swarm.stats("svc1")
    assert gone.value.status_code == 404


def test_a_server_scaled_to_zero_is_running_until_its_container_stops():
    """`container-stop` must not say "stopped" while Swarm still stops the container."""
    scaled_down = SERVICE | {
        "PreviousSpec": {},
        "Spec": SERVICE["Spec"] | {"Mode": {"Replicated": {"Replicas": 0}}},
    }
    api = Api([task("running")])
    api.inspect_service = lambda _: scaled_down
    swarm = SwarmContainers(SimpleNamespace(api=api), Engines(None))
    assert swarm.inspect("svc1")["State"]["Running"] is True
    api._tasks = [task("shutdown", when="2026-01-01T00:00:09Z")]
    state = swarm.inspect("svc1")["State"]
    assert state["Running"] is False and state["FinishedAt"] == "2026-01-01T00:00:09Z"
