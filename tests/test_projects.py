"""ds01hub.actions.projects: planning (pure) and init on a real temporary directory with real
git."""

import shutil
import subprocess

import pytest

from ds01hub.actions.projects import (
    ML_GITIGNORE,
    ProjectError,
    ProjectSpec,
    init_project,
    plan_project,
    python_package_name,
    validate_project_name,
)

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.mark.parametrize("name", ["a", "my-thesis", "Proj_2.v3", "x" * 63])
def test_valid_project_names(name):
    assert validate_project_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "-x", ".hidden", "..", "a/b", "a b", "x" * 64, "ok.", "naïve", "a;rm", None]
)
def test_invalid_project_names_are_refused_with_the_rule(name):
    with pytest.raises(ProjectError, match="project name"):
        validate_project_name(name)


def test_python_package_name():
    assert python_package_name("my-thesis.v2") == "my_thesis_v2"
    assert python_package_name("2024-study") == "p_2024_study"


def test_plan_contains_layout_readme_gitignore_and_package():
    plan = plan_project(ProjectSpec(name="cells", description="Segmenting cells", use_case="cv"))
    assert {"data/raw", "data/processed", "notebooks", "src", "models", "data/images"} <= set(
        plan.directories
    )
    assert plan.files[".gitignore"] == ML_GITIGNORE
    assert "# cells" in plan.files["README.md"]
    assert "Segmenting cells" in plan.files["README.md"]
    assert "Computer vision" in plan.files["README.md"]
    assert "src/cells/__init__.py" in plan.files
    # Ignored directories get no .gitkeep (it would be ignored anyway); kept ones do.
    assert "data/raw/.gitkeep" not in plan.files
    assert "notebooks/.gitkeep" in plan.files


def test_plan_refuses_unknown_use_case():
    with pytest.raises(ProjectError, match="use case 'audio'.*general"):
        plan_project(ProjectSpec(name="p", use_case="audio"))


def test_gitignore_keeps_data_and_weights_out():
    for pattern in ("data/raw/", "models/", "*.ckpt", ".ipynb_checkpoints/", ".env"):
        assert pattern in ML_GITIGNORE.splitlines()


def test_init_without_git_writes_everything(tmp_path):
    result = init_project(ProjectSpec(name="demo", git=False), tmp_path)
    root = tmp_path / "demo"
    assert result.path == root.resolve()
    assert (root / "README.md").is_file() and (root / "data/raw").is_dir()
    assert not (root / ".git").exists()
    assert not result.git_initialized
    assert root.resolve() / ".gitignore" in result.created_files


def test_init_never_overwrites_existing_files(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    (root / "README.md").write_text("my own notes\n")
    result = init_project(ProjectSpec(name="demo", git=False), tmp_path)
    assert (root / "README.md").read_text() == "my own notes\n"
    assert (root / "README.md").resolve() in result.kept_files
    assert "kept existing files untouched: README.md" in result.summary()


def test_init_refuses_when_a_file_is_in_the_way_and_writes_nothing(tmp_path):
    (tmp_path / "demo").write_text("a file, not a directory")
    with pytest.raises(ProjectError, match="not a directory"):
        init_project(ProjectSpec(name="demo", git=False), tmp_path)
    assert (tmp_path / "demo").read_text() == "a file, not a directory"


def test_init_refuses_missing_parent(tmp_path):
    with pytest.raises(ProjectError, match="does not exist"):
        init_project(ProjectSpec(name="demo"), tmp_path / "nope")


def test_init_refuses_without_git_binary_before_writing(tmp_path):
    with pytest.raises(ProjectError, match="not found on PATH.*without git"):
        init_project(ProjectSpec(name="demo"), tmp_path, git_binary="no-such-git-binary")
    assert not (tmp_path / "demo").exists()


@needs_git
def test_init_with_git_makes_an_initial_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.gitconfig: the identity fallback is used
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    monkeypatch.delenv("GIT_AUTHOR_EMAIL", raising=False)
    monkeypatch.delenv("GIT_COMMITTER_EMAIL", raising=False)
    result = init_project(ProjectSpec(name="demo", description="d"), tmp_path)
    root = tmp_path / "demo"
    assert result.git_initialized and result.git_committed
    log = subprocess.run(
        ["git", "log", "--format=%an <%ae>|%s"], cwd=root, capture_output=True, text=True
    ).stdout
    assert log.strip() == "alice <alice@localhost>|Initialise project demo"
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    assert "README.md" in tracked.stdout.split()
    assert ".gitignore" in tracked.stdout.split()
    # Re-running leaves the repository alone and writes nothing new.
    again = init_project(ProjectSpec(name="demo"), tmp_path)
    assert again.created_files == [] and not again.git_initialized
    assert again.git_message == "existing repository left as it is"
