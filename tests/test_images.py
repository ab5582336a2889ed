"""ds01hub.actions.images: templates, strict package validation, Dockerfile rendering (fast, pure)
and a real small build against the Docker engine (marked ``docker``)."""

import json
import re
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds01hub.actions.images import (
    CA_BUNDLE_IN_IMAGE,
    HEAVY_BUILD_MB,
    TEMPLATES,
    ImageError,
    ImageQuotaError,
    ImageSpec,
    build_events,
    check_image_quota,
    dockerfile_steps,
    download_estimate_mb,
    get_template,
    image_repository,
    image_tag,
    parse_package_list,
    plain_text,
    render_dockerfile,
    spec_from_request,
    validate_apt_package,
    validate_image_name,
    validate_pip_requirement,
)

# ---------------------------------------------------------------- templates


def test_the_five_use_case_templates_exist():
    assert list(TEMPLATES) == ["general", "cv", "nlp", "rl", "custom"]
    assert get_template("custom").pip_packages == ()
    assert "torchvision" in get_template("cv").pip_packages
    for template in TEMPLATES.values():
        for requirement in template.pip_packages:
            validate_pip_requirement(requirement)
        for package in template.apt_packages:
            validate_apt_package(package)


def test_unknown_template_names_the_choices():
    with pytest.raises(ImageError, match="unknown image template 'audio'.*general, cv"):
        get_template("audio")


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "requirement",
    ["six", "torch==2.3.1", "transformers[torch]>=4.40,<5", "a.b_c-d", "numpy~=1.26", "x!=1.0"],
)
def test_plain_pip_requirements_pass(requirement):
    assert validate_pip_requirement(requirement) == requirement


@pytest.mark.parametrize(
    "requirement",
    [
        "",
        "six; rm -rf /",
        "six && curl evil",
        "six\nRUN curl evil",
        "--index-url=http://evil",
        "-e.",
        "git+https://github.com/x/y",
        "pkg @ https://evil/x.whl",
        "./local",
        "/abs/path",
        "six==1.0 ; python_version<'3'",
        "six$(id)",
        "six`id`",
        '"six"',
        "six==",
        "six>1 ",
        "x" * 200,
    ],
)
def test_injection_and_non_package_pip_input_is_refused(requirement):
    with pytest.raises(ImageError, match="invalid pip package"):
        validate_pip_requirement(requirement)


@pytest.mark.parametrize("package", ["git", "libgl1", "libglib2.0-0", "g++", "ffmpeg=7:5.1-1"])
def test_debian_package_names_pass(package):
    assert validate_apt_package(package) == package


@pytest.mark.parametrize(
    "package", ["", "a", "Git", "git;id", "git\nRUN id", "-o=foo", "../x", "git vim", "a$(id)"]
)
def test_bad_apt_packages_are_refused(package):
    with pytest.raises(ImageError, match="invalid apt package"):
        validate_apt_package(package)


@pytest.mark.parametrize("name", ["x", "thesis-cv", "a.b_c", "v2"])
def test_good_image_names(name):
    assert validate_image_name(name) == name


@pytest.mark.parametrize("name", ["", "Upper", "-x", "x-", "a/b", "a:b", "a--b", "x" * 65, "é"])
def test_bad_image_names(name):
    with pytest.raises(ImageError, match="invalid image name"):
        validate_image_name(name)


def test_parse_package_list_splits_and_dedupes():
    assert parse_package_list("six, numpy==2.0\n rich  six") == ("six", "numpy==2.0", "rich")
    assert parse_package_list(["six", " six ", ""]) == ("six",)
    assert parse_package_list(None) == ()
    with pytest.raises(ImageError, match="strings"):
        parse_package_list(["six", 3])


def test_spec_validation_names_the_bad_package():
    with pytest.raises(ImageError, match="'six;id'"):
        ImageSpec("alice", "img", pip_packages=("six;id",)).validated()
    with pytest.raises(ImageError, match="too many packages"):
        ImageSpec("alice", "img", pip_packages=tuple(f"p{i}" for i in range(101))).validated()


# ---------------------------------------------------------------- naming


def test_tags_live_in_the_users_namespace():
    assert image_tag("alice", "cv") == "ds01-alice/cv:latest"
    # Escaping keeps different users apart and yields a valid docker repository name.
    assert image_repository("Alice") != image_repository("alice")
    assert image_repository("a-40b") != image_repository("a@b")
    docker_repo = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*$")
    for user in ["alice", "Alice", "a@b.org", "-x", "üser", "a_b"]:
        assert docker_repo.match(image_repository(user)), user


# ---------------------------------------------------------------- Dockerfile


def _run_lines(dockerfile: str) -> list[str]:
    return [line for line in dockerfile.splitlines() if line.startswith("RUN ")]


def test_dockerfile_custom_with_one_pip_package_uses_exec_form():
    spec = ImageSpec("alice", "tiny", "custom", pip_packages=("six",))
    dockerfile = render_dockerfile(spec, "ds01/singleuser:abc", base_user="jovyan")
    lines = dockerfile.splitlines()
    assert lines[0] == "FROM ds01/singleuser:abc"
    assert lines[-1] == "USER jovyan"
    [run] = _run_lines(dockerfile)
    assert json.loads(run[4:])[-1] == "six"
    assert "apt-get" not in dockerfile and "ca-bundle" not in dockerfile


def test_dockerfile_template_packages_then_extras_and_ca_bundle():
    spec = ImageSpec("alice", "vision", "cv", pip_packages=("rich", "torch"), apt_packages=("vim",))
    dockerfile = render_dockerfile(spec, "base:1", ca_bundle=True)
    assert f"COPY ca-bundle.crt {CA_BUNDLE_IN_IMAGE}" in dockerfile
    assert f"PIP_CERT={CA_BUNDLE_IN_IMAGE}" in dockerfile
    apt_line = next(line for line in _run_lines(dockerfile) if "apt-get install" in line)
    assert apt_line.split("--no-install-recommends ")[1].split(" &&")[0] == (
        "git libgl1 libglib2.0-0 vim"
    )
    pip_line = json.loads(_run_lines(dockerfile)[-1][4:])
    assert pip_line[-2:] == ["albumentations", "rich"]  # torch is not repeated


def test_dockerfile_rendering_revalidates_the_spec():
    with pytest.raises(ImageError):
        render_dockerfile(ImageSpec("alice", "x", pip_packages=("six\nRUN id",)), "base")


@pytest.mark.parametrize(
    "spec",
    [
        ImageSpec("alice", "x", pip_packages=("six\nLABEL ds01.user=bob",)),
        ImageSpec("alice", "x", apt_packages=("vim\nLABEL ds01.gpus=0",)),
        ImageSpec("alice", "x\nLABEL ds01.priority=100"),
        ImageSpec("alice", "x", pip_packages=("six\x0bLABEL ds01.user=bob",)),
    ],
)
def test_no_user_input_puts_a_label_into_the_dockerfile(spec):
    """An image's labels reach every container made from it and every build step."""
    with pytest.raises(ImageError):
        render_dockerfile(spec, "base")


def test_a_rendered_dockerfile_holds_only_ds01hubs_own_instructions():
    dockerfile = render_dockerfile(ImageSpec("alice", "x", "cv", ("rich",)), "b:1", ca_bundle=True)
    assert {line.split(" ", 1)[0] for line in dockerfile.splitlines()} <= {
        "FROM",
        "USER",
        "COPY",
        "ENV",
        "RUN",
    }
    with pytest.raises(ImageError, match="does not write"):
        render_dockerfile(ImageSpec("alice", "x"), "base\nLABEL ds01.user=bob")


# ---------------------------------------------------------------- build stream parsing


def test_build_events_progress_and_done():
    chunks = [
        {"stream": "Step 1/3 : FROM base\n"},
        {"stream": " ---> abc\n"},
        {"stream": "Step 2/3 : RUN pip install six\n"},
        {"stream": "Collecting six\n"},
        {"stream": "Step 3/3 : USER jovyan\n"},
        {"aux": {"ID": "sha256:feed"}},
        {"stream": "Successfully built feed\n"},
    ]
    events = list(build_events(chunks, "ds01-alice/x:latest"))
    steps = [e for e in events if e.kind == "step"]
    assert [(e.step, e.total_steps) for e in steps] == [(1, 3), (2, 3), (3, 3)]
    assert [round(e.progress, 2) for e in steps] == [0.0, 0.33, 0.67]
    assert events[-1].kind == "done" and events[-1].image_id == "sha256:feed"
    assert events[-1].progress == 1.0 and events[-1].tag == "ds01-alice/x:latest"


def test_build_events_progress_ignores_the_label_steps_docker_appends():
    chunks = [{"stream": f"Step {i}/10 : X\n"} for i in range(1, 11)] + [{"aux": {"ID": "i"}}]
    steps = [e for e in build_events(chunks, "t", work_steps=4) if e.kind == "step"]
    assert [round(e.progress, 2) for e in steps[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(e.progress == 1.0 for e in steps[4:])
    assert dockerfile_steps("FROM a\nUSER root\n\nRUN x\n") == 3


def test_build_events_error_stops_the_stream():
    chunks = [{"stream": "Step 1/2 : FROM b\n"}, {"error": "pip failed\n"}, {"stream": "later"}]
    events = list(build_events(chunks, "t"))
    assert events[-1].kind == "error" and events[-1].text == "pip failed"
    assert "later" not in [e.text for e in events]


def test_build_events_without_image_is_an_error():
    assert list(build_events([{"stream": "hi"}], "t"))[-1].kind == "error"


def test_download_estimate_names_the_heavy_packages_once():
    assert download_estimate_mb(["six", "numpy"]) == (0, [])
    assert download_estimate_mb(["Torch==2.4", "torch[opt]>=2", "TensorFlow"]) == (
        3100,
        ["torch", "tensorflow"],
    )
    size, heavy = download_estimate_mb(TEMPLATES["general"].pip_packages)
    assert heavy == ["torch"] and size >= HEAVY_BUILD_MB
    assert download_estimate_mb(TEMPLATES["custom"].pip_packages)[0] < HEAVY_BUILD_MB


def test_stored_build_log_lines_carry_no_terminal_codes():
    chunks = [
        {"stream": "Step 1/1 : RUN pip install six\n"},
        {"stream": "\x1b[1;31mERROR:\x1b[0m no \x1b]0;title\x07colour\n"},
        {"stream": "Downloading  10%\rDownloading  55%\rDownloading 100%\n"},
        {"stream": "\x1b[?25l\x1b[2K\x1b(Bdone\x1b[?25h\n"},
        {"aux": {"ID": "i"}},
    ]
    texts = [e.text for e in build_events(chunks, "t")]
    assert texts[1:4] == ["ERROR: no colour", "Downloading 100%", "done"]
    failed = list(build_events([{"error": "\x1b[31mpip failed\x1b[0m\n"}], "t"))
    assert failed[-1].text == "pip failed"


@given(st.text())
def test_plain_text_leaves_no_control_character_and_is_stable(line):
    shown = plain_text(line)
    assert not any(ord(c) < 32 and c not in "\t\n" or 0x7F <= ord(c) <= 0x9F for c in shown)
    assert plain_text(shown) == shown


# ---------------------------------------------------------------- real build (Docker)

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.mark.docker
def test_real_build_list_and_delete(docker_client, singleuser_image):
    from ds01hub.actions.images import build_image, delete_user_image, list_user_images

    owner, other = f"img-{uuid.uuid4().hex[:6]}", f"img-{uuid.uuid4().hex[:6]}"
    spec = ImageSpec(owner, "tiny", "custom", pip_packages=("six",))
    try:
        events = list(build_image(docker_client, spec, singleuser_image, ca_bundle=HOST_CA_BUNDLE))
        assert events[-1].kind == "done", [e.text for e in events[-15:]]
        assert any(e.kind == "step" for e in events)
        assert any("six" in e.text for e in events if e.kind == "log")
        listed = list_user_images(docker_client, owner)
        assert [i.tag for i in listed] == [spec.tag]
        assert listed[0].pip_packages == ("six",) and listed[0].template == "custom"
        assert list_user_images(docker_client, other) == []
        with pytest.raises(ImageError, match="no image called"):
            delete_user_image(docker_client, other, "tiny")
        output = docker_client.containers.run(
            spec.tag,
            ["python3", "-c", "import six; print(six.__name__)"],
            remove=True,
            labels={"ds01.test": "1", "ds01.test.images": "1"},
        )
        assert output.strip() == b"six"
        assert delete_user_image(docker_client, owner, "tiny") == spec.tag
        assert list_user_images(docker_client, owner) == []
    finally:
        for image in docker_client.images.list(filters={"label": f"ds01.image.user={owner}"}):
            docker_client.images.remove(image.id, force=True)


# ---------------------------------------------------------------- build requests and quota


def test_a_build_request_becomes_a_validated_spec_for_the_authenticated_user():
    spec = spec_from_request(
        "alice", {"name": "nlp", "template": "nlp", "pip_packages": "rich, six==1.16.0"}
    )
    assert spec == ImageSpec("alice", "nlp", "nlp", ("rich", "six==1.16.0"), ())
    with pytest.raises(ImageError) as info:
        spec_from_request("alice", {"name": "x", "user": "bob", "shell": "rm -rf /"})
    assert str(info.value) == "unknown field(s) shell, user" and info.value.status == 400
    assert info.value.hint == "send name, template, pip_packages and apt_packages"
    with pytest.raises(ImageError, match="invalid pip package"):
        spec_from_request("alice", {"name": "x", "pip_packages": ["six; rm -rf /"]})


def test_the_image_quota_counts_new_names_only():
    check_image_quota(["a"], "b", limit=2)
    check_image_quota(["a", "b"], "b", limit=2)  # a rebuild takes no new place
    check_image_quota(["a", "b", "c"], "d", limit=0)  # 0: no limit
    with pytest.raises(ImageQuotaError) as info:
        check_image_quota(["a", "b"], "c", limit=2)
    assert str(info.value) == "you already have 2 images, the limit is 2"
    assert info.value.status == 409 and "image-delete NAME" in info.value.hint
