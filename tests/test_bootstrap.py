"""Unit tests of ds01hub.host.bootstrap's and ds01hub.host.demo's pure parts (no Docker, no
network)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds01hub.cli.admin import register_demo
from ds01hub.host import bootstrap, demo
from ds01hub.host.bootstrap import (
    BootstrapError,
    base_image_recipe,
    base_image_tag,
    collect_singleuser_inputs,
    hash_inputs,
    package_source_roots,
    project_requirements,
    source_files,
)

REPO = Path(__file__).resolve().parents[1]

PYPROJECT = {
    "project": {
        "dependencies": ["jupyterhub>=5.0", "docker>=7.0", "pyyaml>=6.0"],
        "optional-dependencies": {"singleuser": ["jupyter-server>=2.10"], "test": ["pytest"]},
    },
    "tool": {
        "setuptools": {
            "package-dir": {"ds01hub": "ds01hub", "ds01hub.spawner": "spawner"},
            "data-files": {"etc/jupyter": ["jupyter-config/ext.json"]},
        }
    },
}


def test_hash_is_stable_order_free_and_sensitive_to_names_and_content():
    parts = [("a", b"1"), ("b", b"2")]
    assert hash_inputs(parts) == hash_inputs(list(reversed(parts)))
    assert hash_inputs(parts) != hash_inputs([("a", b"1"), ("b", b"3")])
    assert hash_inputs(parts) != hash_inputs([("a", b"1"), ("c", b"2")])
    # the boundary between name and content is part of the hash
    assert hash_inputs([("ab", b"c")]) != hash_inputs([("a", b"bc")])
    assert len(hash_inputs(parts)) == 12


def test_base_image_tag_follows_the_recipe():
    recipe = base_image_recipe()
    assert base_image_tag(recipe) == base_image_tag(base_image_recipe())
    assert base_image_tag(recipe).startswith("ds01hub/base:")
    assert base_image_tag(recipe) != base_image_tag(base_image_recipe(packages=["python3"]))
    command = bootstrap.mmdebstrap_command(recipe, Path("/tmp/rootfs.tar"))
    assert "--variant=minbase" in command
    assert any(arg.startswith("--include=") and "python3-venv" in arg for arg in command)
    assert command[-2:] == ["bookworm", "/tmp/rootfs.tar"]


def test_requirements_pin_the_hubs_jupyterhub_and_take_the_singleuser_extra():
    requirements = project_requirements(PYPROJECT, "6.1.1")
    assert requirements[0] == "jupyterhub==6.1.1"
    assert "jupyterhub>=5.0" not in requirements
    assert {"docker>=7.0", "pyyaml>=6.0", "jupyter-server>=2.10", "jupyterlab"} <= set(requirements)
    assert "pytest" not in requirements
    with_culler = PYPROJECT["project"]["dependencies"] + ["jupyterhub-idle-culler>=1"]
    pyproject = {"project": PYPROJECT["project"] | {"dependencies": with_culler}}
    assert "jupyterhub-idle-culler>=1" in project_requirements(pyproject, "6.1.1")
    assert bootstrap.requirement_name("Jupyter_Hub.x >=5; python_version>'3'") == "jupyter-hub-x"


def test_package_sources_are_the_mapped_packages_and_data_files_only():
    assert package_source_roots(PYPROJECT) == [
        "ds01hub",
        "jupyter-config/ext.json",
        "pyproject.toml",
        "spawner",
    ]


def test_source_files_skip_build_debris(tmp_path):
    for name in ("pkg/a.py", "pkg/__pycache__/a.cpython-311.pyc", "pkg/b.pyc", "pkg/x.egg-info/P"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert source_files(tmp_path, ["pkg", "missing"]) == [Path("pkg/a.py")]


def _copy_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", ".state", "build", "__pycache__", "*.pyc"),
    )
    return source


def test_singleuser_tag_changes_with_package_source_but_not_with_tests_or_docs(tmp_path):
    source = _copy_source(tmp_path)
    tag = collect_singleuser_inputs(source, "ds01hub/base:x", None).tag()
    (source / "README.md").write_text("changed docs")
    (source / "tests" / "test_new.py").write_text("def test(): pass\n")
    assert collect_singleuser_inputs(source, "ds01hub/base:x", None).tag() == tag
    with (source / "ds01hub" / "units.py").open("a") as handle:
        handle.write("\n# changed\n")
    changed = collect_singleuser_inputs(source, "ds01hub/base:x", None).tag()
    assert changed != tag
    assert collect_singleuser_inputs(source, "ds01hub/base:y", None).tag() != changed
    bundle = tmp_path / "site-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert collect_singleuser_inputs(source, "ds01hub/base:x", bundle).tag() != changed


def test_a_missing_ca_bundle_is_named_with_the_option(tmp_path):
    with pytest.raises(BootstrapError, match=r"--ca-bundle .*nope\.pem"):
        collect_singleuser_inputs(REPO, "ds01hub/base:x", tmp_path / "nope.pem")


def test_dockerd_gets_the_simulated_hook_only_without_a_real_one():
    assert bootstrap.dockerd_path(False, "/usr/bin").startswith(f"{bootstrap.SIMULATED_GPU_BIN}:")
    assert bootstrap.dockerd_path(True, "/usr/bin") == "/usr/bin"


def test_bootstrap_command_line_usage_errors_exit_2():
    command = [sys.executable, "-m", "ds01hub.host.bootstrap"]
    assert subprocess.run([*command, "--help"], capture_output=True).returncode == 0
    result = subprocess.run([*command, "everything"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice: 'everything'" in result.stderr


# -- the demo --------------------------------------------------------------------------------


def test_demo_config_extends_the_site_config_and_labels_the_demo_password(tmp_path):
    paths = demo.DemoPaths(tmp_path)
    text = demo.render_demo_config(paths, REPO / "config/jupyterhub_config.py", demo.DEMO_USERS)
    compile(text, "jupyterhub_config.py", "exec")
    assert f"load_subconfig({str(REPO / 'config/jupyterhub_config.py')!r})" in text
    assert "DEMO ONLY" in text
    assert "'students': {'users': ['alice', 'bob']}" in text
    assert "c.Authenticator.admin_users = ['dave']" in text
    # a rehearsal of a real host: stopped containers stay (their GPU holds with them)
    assert "c.DockerSpawner.remove = False" in text
    assert "remove = True" not in text
    assert f"siteenv.parse(Path({str(paths.env_file)!r}).read_text())" in text


def test_the_demo_settings_are_a_real_hosts_environment_file(tmp_path):
    """The demo's DS01HUB_* settings go through the same file format as /etc/ds01hub/ds01hub.env
    and name the workspaces, the admin token and the broker socket."""
    from ds01hub.host import siteenv

    paths = demo.DemoPaths(tmp_path)
    args = demo_args(tmp_path)
    settings = demo.demo_settings(paths, args, tmp_path / "ws")
    assert siteenv.parse(siteenv.render(settings)) == settings
    assert settings["DS01HUB_BIND_URL"] == "http://127.0.0.1:8000"
    assert settings["DS01HUB_WORKSPACE_ROOT"] == str(tmp_path / "ws")
    assert settings["DS01HUB_ADMIN_TOKEN_FILE"] == str(paths.admin_token)
    assert settings["DS01HUB_BROKER_SOCKET"] == "/run/ds01hub/broker.sock"


def test_demo_logins_take_the_prefix_of_several_demos_on_one_host(tmp_path):
    args = demo_args(tmp_path, "--user-prefix", "t1")
    assert [u.name for u in demo.demo_users(args)] == ["t1alice", "t1bob", "t1carol", "t1dave"]
    assert [u.admin for u in demo.demo_users(args)] == [False, False, False, True]


def demo_args(tmp_path, *extra: str):
    import argparse

    parser = argparse.ArgumentParser()
    register_demo(parser.add_subparsers())
    return parser.parse_args(["demo", "start", "--state-dir", str(tmp_path), *extra])


def test_demo_limits_simulate_gpus_only_where_there_are_none():
    site = {"defaults": {}, "gpu_allocation": {"enable_mig": True, "simulate": {"gpus": 1}}}
    limits, simulated = demo.demo_limits(site, gpus_present=False)
    assert simulated and limits["gpu_allocation"]["simulate"] == {"gpus": 1}
    limits, simulated = demo.demo_limits(site, gpus_present=True)
    assert not simulated and "simulate" not in limits["gpu_allocation"]
    assert site["gpu_allocation"]["simulate"] == {"gpus": 1}  # the input is left alone
    with pytest.raises(demo.DemoError, match="gpu_allocation.simulate"):
        demo.demo_limits({"gpu_allocation": {}}, gpus_present=False)


def test_the_demo_limits_made_from_the_example_give_a_simulated_inventory(tmp_path):
    import yaml

    from ds01hub.gpu.inventory import load_inventory
    from ds01hub.limits import load_limits

    example = yaml.safe_load((REPO / "config/resource-limits.yaml").read_text())
    limits, simulated = demo.demo_limits(example, gpus_present=False)
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump(limits))
    config = load_limits(path)
    inventory = load_inventory(config.gpu_allocation)
    assert simulated and inventory.simulated
    assert inventory.slots
    for user in demo.DEMO_USERS:
        assert config.resolve(user.name, [user.group]).group == user.group


def test_the_demo_caps_max_cpus_at_the_machines_cpus_and_nothing_else():
    limits = {
        "defaults": {"max_cpus": 4, "memory": "16g"},
        "groups": {"students": {"members": ["a"]}, "admins": {"max_cpus": 16}},
        "user_overrides": {"erin": {"max_cpus": 1.5}},
    }
    fitted, capped = demo.fit_cpus(limits, 2)
    assert capped == ["defaults", "groups.admins"]
    assert fitted["defaults"] == {"max_cpus": 2, "memory": "16g"}
    assert fitted["groups"] == {"students": {"members": ["a"]}, "admins": {"max_cpus": 2}}
    assert fitted["user_overrides"] == {"erin": {"max_cpus": 1.5}}
    assert limits["defaults"]["max_cpus"] == 4  # the input is left alone
    assert demo.fit_cpus(limits, 64) == (limits, [])


def test_stale_tags_are_the_other_hash_tags_of_our_repositories_only():
    tags = [
        "ds01hub/singleuser:aaa111",
        "ds01hub/singleuser:bbb222",
        "ds01hub/singleuser:latest",
        "ds01hub/base:ccc333",
        "ds01hub/base:ddd444",
        "ds01-alice/nlp:latest",
        "registry:5000/ds01hub/singleuser:eee555",
    ]
    stale = bootstrap.stale_tags(
        tags,
        [bootstrap.BASE_REPOSITORY, bootstrap.SINGLEUSER_REPOSITORY],
        keep=["ds01hub/singleuser:bbb222", "ds01hub/base:ddd444"],
    )
    assert stale == ["ds01hub/base:ccc333", "ds01hub/singleuser:aaa111"]
