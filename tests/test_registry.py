"""Users' images on a cluster (`ds01hub.actions.registry`), without a swarm: names, the signed
records, who may run what, the publish step after a build and the swarm spawner's choice of
image. The manager's config API is a recorded stand-in (`Configs`); the real thing is
tests/test_swarm_images.py."""

from __future__ import annotations

import http.server
import threading
from types import SimpleNamespace

import docker.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jupyterhub.spawner import SpawnException

from ds01hub.actions import images
from ds01hub.actions.builds import docker_builder
from ds01hub.actions.registry import (
    ImageRecord,
    Registry,
    delete_published,
    parse_record,
    publish,
    record_labels,
    records,
    resolve_user_image,
    user_image_path,
)
from ds01hub.provenance import Provenance
from ds01hub.spawner.swarm_spawner import DS01SwarmSpawner

TRUST = Provenance("lab-1", b"k" * 32)
REGISTRY = Registry.configured("registry.lab:5000")
DIGEST = "sha256:" + "a" * 64
PINNED = f"registry.lab:5000/ds01-ann/hello@{DIGEST}"


def config(user="ann", name="hello", reference=PINNED, trust=TRUST, created="1", **changes):
    found = record_labels(trust, user, name, reference) | changes
    return {"ID": f"c{created}", "CreatedAt": created, "Spec": {"Labels": found}}


class Configs:
    """`client.api.configs` of a manager that holds `held` (label filters applied)."""

    def __init__(self, *held):
        self.api = self
        self.held = list(held)

    def configs(self, filters):
        wanted = dict(f.split("=", 1) for f in filters["label"])
        return [
            c for c in self.held if all(c["Spec"]["Labels"].get(k) == v for k, v in wanted.items())
        ]


# -- names --------------------------------------------------------------------------------


def test_a_registry_is_host_and_port_and_empty_means_one_host():
    assert Registry.configured("") is None
    assert Registry.configured("registry.lab:5000") == Registry(
        "registry.lab:5000", "http://registry.lab:5000"
    )
    custom = Registry.configured("reg:5000", "https://10.0.0.2:5000/")
    assert custom is not None and custom.url == "https://10.0.0.2:5000"
    for bad in ("http://reg:5000", "reg/x", "-reg", "reg:port", "a b"):
        with pytest.raises(images.ImageError, match="is not a registry address"):
            Registry.configured(bad, setting="Broker.registry")
    with pytest.raises(images.ImageError, match="registry_url"):
        Registry.configured("reg:5000", "http://reg:5000/v2?x")


def test_repositories_are_in_the_users_namespace_and_odd_names_are_refused_by_name():
    assert REGISTRY is not None
    assert REGISTRY.repository("ann", "hello") == "registry.lab:5000/ds01-ann/hello"
    # odd user names are escaped (never shared by two users), as on one host
    assert REGISTRY.repository("Ann Smith", "x") == "registry.lab:5000/ds01--41nn-20-53mith/x"
    for name in ("Hello", "he llo", "../x", "x:latest", "x/y", "", "-x"):
        with pytest.raises(images.ImageError, match="invalid image name"):
            REGISTRY.repository("ann", name)
    with pytest.raises(images.ImageError, match="a user name is required"):
        REGISTRY.repository("", "x")
    with pytest.raises(images.ImageError, match="longer than 255 characters"):
        REGISTRY.repository("ü" * 60, "x")


@pytest.mark.parametrize(
    ("requested", "path"),
    [
        ("ds01-ann/hello", "ds01-ann/hello"),
        ("ds01-ann/hello:latest", "ds01-ann/hello"),
        ("registry.lab:5000/ds01-ann/hello", "ds01-ann/hello"),
        (PINNED, "ds01-ann/hello"),
        ("localhost/ds01-ann/hello", "ds01-ann/hello"),
        ("registry.lab:5000/ds01hub/singleuser:1", None),
        ("busybox", None),
        ("lab/ds01-ann/hello", None),
    ],
)
def test_which_references_name_a_users_image(requested, path):
    assert user_image_path(requested) == path


@pytest.mark.parametrize("requested", ["ds01-ann/hello:v2", "ds01-ann/hello@sha256:short"])
def test_a_users_image_has_only_the_tag_latest(requested):
    with pytest.raises(images.ImageError, match="only the tag latest"):
        user_image_path(requested)


# -- records --------------------------------------------------------------------------------


def test_only_records_this_deployment_signed_are_read():
    assert parse_record(TRUST, config()) == ImageRecord("ann", "hello", PINNED, "1", "c1")
    forged = [
        config(**{"ds01.image.user": "bob"}),  # another owner under ann's signature
        config(**{"ds01.image.reference": PINNED.replace("a" * 64, "b" * 64)}),
        config(trust=Provenance("lab-1", b"x" * 32)),  # another key
        config(trust=Provenance("lab-2", b"k" * 32)),  # another deployment
        config(reference="registry.lab:5000/ds01-ann/hello:latest"),  # a tag, not a digest
        config(**{"ds01.image.signature": ""}),
    ]
    assert [parse_record(TRUST, c) for c in forged] == [None] * len(forged)


def test_the_newest_record_wins_and_forged_ones_are_skipped():
    newer = PINNED.replace("a" * 64, "c" * 64)
    manager = Configs(
        config(created="2", reference=newer),
        config(created="1"),
        config(created="3", trust=Provenance("lab-1", b"x" * 32)),
    )
    found = records(manager, TRUST, "ann")
    assert [r.reference for r in found] == [PINNED, newer]
    assert resolve_user_image(found, "ds01-ann/hello", "ann") == newer
    assert resolve_user_image(found, PINNED, "ann") == PINNED  # an older digest, asked for


def test_owners_and_admins_run_a_users_image_nobody_else():
    found = records(Configs(config()), TRUST)
    assert resolve_user_image(found, "ds01-ann/hello", "ann") == PINNED
    assert resolve_user_image(found, "ds01-ann/hello", "dave", admin=True) == PINNED
    assert resolve_user_image(found, "registry.lab:5000/ds01hub/singleuser:1", "bob") is None
    for requested, user in (("ds01-ann/hello", "bob"), ("ds01-ann/other", "ann")):
        with pytest.raises(images.ImageNotFoundError, match=f"no image '{requested}'"):
            resolve_user_image(found, requested, user)
    with pytest.raises(images.ImageNotFoundError):
        resolve_user_image(found, PINNED.replace("a" * 64, "d" * 64), "ann")


@given(owner=st.text(min_size=1, max_size=20), other=st.text(min_size=1, max_size=20))
def test_a_record_signed_for_one_user_never_serves_another(owner, other):
    """Whatever the names, another user is refused and a record relabelled for them does not
    verify."""
    if owner == other:
        return
    path = f"{images.image_repository(owner)}/hello"
    reference = f"registry.lab:5000/{path}@{DIGEST}"
    found = records(Configs(config(user=owner, reference=reference)), TRUST)
    assert resolve_user_image(found, path, owner) == reference
    with pytest.raises(images.ImageNotFoundError):
        resolve_user_image(found, path, other)
    relabelled = config(user=owner, reference=reference, **{"ds01.image.user": other})
    assert parse_record(TRUST, relabelled) is None


# -- the build's publish step and the spawner's image ----------------------------------------


def test_the_publish_step_replaces_the_builds_done(monkeypatch):
    built = [images.BuildEvent("log", "Step 1/1"), images.BuildEvent("done", "built", 1.0)]
    monkeypatch.setattr(images, "build_image", lambda *args, **kwargs: iter(built))
    seen = []

    def publish(spec, done):
        seen.append((spec.name, done.kind))
        yield images.BuildEvent("log", "pushed")
        yield done

    run = docker_builder(object(), "base", publish=publish)
    kinds = [(e.kind, e.text) for e in run(images.ImageSpec("ann", "hello"))]
    assert kinds == [("log", "Step 1/1"), ("log", "pushed"), ("done", "built")]
    assert seen == [("hello", "done")]


def spawner(user: str, image: str | None, manager) -> DS01SwarmSpawner:
    made = DS01SwarmSpawner(
        user=SimpleNamespace(name=user, id=1, url=f"/user/{user}/", escaped_name=user),
        hub=SimpleNamespace(url="http://hub/", api_url="http://hub/api", public_host=""),
        orm_spawner=None,
    )
    made.image = "registry.lab:5000/ds01hub/singleuser:1"
    made.user_options = {} if image is None else {"image": image}
    made.__class__._client = manager.api
    return made


@pytest.fixture(autouse=True)
def _no_shared_client():
    yield
    DS01SwarmSpawner._client = None


def test_the_swarm_spawner_runs_the_labs_image_or_the_users_own_pinned():
    manager = Configs(config())
    lab = "registry.lab:5000/ds01hub/singleuser:1"
    assert spawner("ann", None, manager)._image(TRUST) == lab
    assert spawner("ann", lab, manager)._image(TRUST) == lab
    assert spawner("ann", "ds01-ann/hello", manager)._image(TRUST) == PINNED
    with pytest.raises(SpawnException, match="you have no image 'ds01-ann/hello'") as refused:
        spawner("bob", "ds01-ann/hello", manager)._image(TRUST)
    assert refused.value.status_code == 404
    with pytest.raises(SpawnException, match="not available on the cluster") as other:
        spawner("bob", "evil/miner:latest", manager)._image(TRUST)
    assert other.value.status_code == 403
    with pytest.raises(SpawnException, match="only the tag latest"):
        spawner("ann", "ds01-ann/hello:v2", manager)._image(TRUST)


# -- publish and delete against a recorded engine and a loopback registry ---------------------


class Engine(Configs):
    """The manager's engine calls `publish` and `delete_published` make: pushes answer
    `digest` (or `error`), configs are kept, services use `used`."""

    def __init__(self, *held, digest=DIGEST, error=None, used=()):
        super().__init__(*held)
        self.digest, self.error, self.used = digest, error, list(used)
        self.removed: list[str] = []
        self.images = SimpleNamespace(get=self._no_local_image)  # pruned on the manager

    @staticmethod
    def _no_local_image(tag):
        raise docker.errors.ImageNotFound(tag)

    def tag(self, image, repository, tag):
        assert image == "ds01-ann/hello:latest"

    def push(self, repository, tag, stream, decode):
        if self.error:
            return iter([{"status": "Preparing"}, {"error": self.error}])
        return iter([{"status": "Pushed"}, {"aux": {"Tag": tag, "Digest": self.digest}}])

    def remove_image(self, reference, noprune=False):
        assert reference == "registry.lab:5000/ds01-ann/hello:latest"

    def create_config(self, name, data, labels):
        self.held.append(
            {"ID": name, "CreatedAt": str(len(self.held) + 10), "Spec": {"Labels": labels}}
        )

    def remove_config(self, config_id):
        self.removed.append(config_id)
        self.held = [c for c in self.held if c["ID"] != config_id]

    def services(self):
        return [{"Spec": {"TaskTemplate": {"ContainerSpec": {"Image": i}}}} for i in self.used]


def test_a_rebuild_records_the_new_digest_and_drops_the_old_unless_a_server_uses_it(monkeypatch):
    deleted = []
    monkeypatch.setattr(
        "ds01hub.actions.registry._delete_manifest", lambda registry, record: deleted.append(record)
    )
    newer = "sha256:" + "e" * 64
    engine = Engine(config(), digest=newer)
    pinned = publish(engine, REGISTRY, TRUST, images.ImageSpec("ann", "hello"))
    assert pinned == f"registry.lab:5000/ds01-ann/hello@{newer}"
    assert [r.reference for r in records(engine, TRUST, "ann")] == [pinned]
    assert [r.reference for r in deleted] == [PINNED]
    # the same again, while a stopped server still uses the older one: kept in the registry
    deleted.clear()
    engine = Engine(config(), digest=newer, used=[PINNED])
    publish(engine, REGISTRY, TRUST, images.ImageSpec("ann", "hello"))
    assert deleted == [] and engine.removed == ["c1"]


def test_a_failed_push_is_a_named_error_and_records_nothing():
    engine = Engine(error="connection refused")
    with pytest.raises(images.ImageError, match="pushing registry.lab:5000/ds01-ann/hello:latest"):
        publish(engine, REGISTRY, TRUST, images.ImageSpec("ann", "hello"))
    assert engine.held == []


def test_delete_is_refused_while_a_server_uses_the_image():
    engine = Engine(config(), used=[PINNED])
    with pytest.raises(images.ImageInUseError, match="used by a server"):
        delete_published(engine, REGISTRY, TRUST, "ann", "hello")
    assert engine.removed == []


@pytest.fixture
def registry_answering():
    """A loopback HTTP server answering every request with the status it is given."""
    answer = {"status": 202}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_DELETE(self):
            self.send_response(answer["status"])
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_DELETE

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield answer, Registry.configured("registry.lab:5000", f"http://127.0.0.1:{server.server_port}")
    server.shutdown()


def test_a_registry_that_refuses_deletes_says_how_to_allow_them(registry_answering):
    answer, registry = registry_answering
    answer["status"] = 405
    engine = Engine(config())
    with pytest.raises(images.ImageError, match="405") as refused:
        delete_published(engine, registry, TRUST, "ann", "hello")
    assert "storage.delete.enabled: true" in refused.value.hint
    assert engine.removed == []  # the record stays: image-delete can be run again


def test_an_unreachable_registry_is_named():
    registry = Registry.configured("registry.lab:5000", "http://127.0.0.1:9")
    with pytest.raises(images.ImageError, match="cannot reach the registry at http://127.0.0.1:9"):
        delete_published(Engine(config()), registry, TRUST, "ann", "hello")


def test_delete_of_an_image_only_the_registry_has_removes_manifest_and_record(registry_answering):
    answer, registry = registry_answering
    engine = Engine(config())
    assert delete_published(engine, registry, TRUST, "ann", "hello") == "ds01-ann/hello:latest"
    assert engine.removed == ["c1"] and records(engine, TRUST) == []
    with pytest.raises(images.ImageNotFoundError, match="no image called 'hello'"):
        delete_published(engine, registry, TRUST, "ann", "hello")


def test_a_bad_registry_setting_stops_the_service_at_its_start_by_name():
    from traitlets import TraitError

    from ds01hub.services.broker.app import Broker

    with pytest.raises(TraitError, match=r"Broker.registry 'http://reg' .* give host\[:port\]"):
        Broker(registry="http://reg")
    with pytest.raises(TraitError, match="Broker.registry_url 'reg:5000' must be http"):
        Broker(registry_url="reg:5000")
    assert Broker(registry="reg:5000").cluster_registry() == Registry("reg:5000", "http://reg:5000")
    assert Broker().cluster_registry() is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1.41/images/registry.lab:5000/ds01-ann/hello/push"),
        ("POST", "/v1.41/images/ds01-ann/hello/push"),
        ("POST", "/v1.41/configs/create"),
        ("POST", "/v1.41/services/create"),
        ("GET", "/v1.41/configs"),
    ],
)
def test_no_user_pushes_or_records_an_image_through_the_socket_proxy(method, path):
    """The other doors to the registry and the records: a user's docker CLI reaches the
    engine through the socket proxy, which has no push, configs or services."""
    from ds01hub.dockerproxy.policy import Denied, classify, parse_target

    with pytest.raises(Denied) as refused:
        classify(parse_target(method, path))
    assert refused.value.status in (403, 404)
