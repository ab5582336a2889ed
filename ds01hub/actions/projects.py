"""Project initialisation: directory layout, README, ML .gitignore and ``git init``.

One implementation for two front ends: the ``project-init`` command on the host and the
notebook wizard (through the server extension, on the user's files in their container).

The module is split in two halves:

* pure planning (:func:`plan_project`): from a :class:`ProjectSpec` to the directories and
  file contents that make up a project. No file system, easy to test and to preview in a
  wizard before anything is written;
* the edge (:func:`init_project`): applies a plan under a given parent directory, never
  overwrites an existing file (existing files are reported as kept), and runs ``git init``.

Example::

    spec = ProjectSpec(name="my-thesis", description="Segmenting cells", use_case="cv")
    result = init_project(spec, Path.home())
    print(result.summary())
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ds01hub.errors import Ds01hubError

__all__ = [
    "ML_GITIGNORE",
    "USE_CASES",
    "ProjectError",
    "ProjectPlan",
    "ProjectResult",
    "ProjectSpec",
    "init_project",
    "plan_project",
    "python_package_name",
    "validate_project_name",
]

#: Project names become directory names and (for the hub) server names: keep them portable.
PROJECT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

#: Use cases a project can be set up for; the keys match the image templates in
#: :mod:`ds01hub.actions.images`, so a wizard can offer one choice for both.
USE_CASES: Mapping[str, str] = {
    "general": "General machine learning",
    "cv": "Computer vision",
    "nlp": "Natural language processing",
    "rl": "Reinforcement learning",
    "custom": "Custom",
}

#: Directories every project gets, with the reason shown in the README and the guided wizard.
BASE_DIRECTORIES: Mapping[str, str] = {
    "data/raw": "original data, never edited (ignored by git)",
    "data/processed": "data derived from raw by code in src/ (ignored by git)",
    "notebooks": "exploration notebooks",
    "src": "reusable code, imported by notebooks and scripts",
    "configs": "experiment configuration files",
    "models": "trained model weights and checkpoints (ignored by git)",
    "results": "figures, tables and logs produced by experiments",
    "tests": "tests for the code in src/",
}

#: Extra directories per use case.
USE_CASE_DIRECTORIES: Mapping[str, Mapping[str, str]] = {
    "cv": {"data/images": "image datasets (ignored by git)"},
    "nlp": {"data/corpora": "text corpora (ignored by git)", "tokenizers": "trained tokenizers"},
    "rl": {"envs": "environment definitions and wrappers", "runs": "episode logs (ignored)"},
}

#: The .gitignore written into every project: Python, notebooks, data, weights, experiment logs.
ML_GITIGNORE = """\
# Python
__pycache__/
*.py[cod]
*.egg-info/
.eggs/
build/
dist/
.venv/
venv/
.pytest_cache/
.mypy_cache/
.ruff_cache/

# Jupyter
.ipynb_checkpoints/
.virtual_documents/

# Data and models are large and often licensed: keep them out of git
data/raw/
data/processed/
data/images/
data/corpora/
models/
*.ckpt
*.pt
*.pth
*.onnx
*.h5
*.safetensors
*.npy
*.npz
*.parquet
*.pkl

# Experiment tracking
runs/
wandb/
mlruns/
lightning_logs/
outputs/
.tensorboard/

# Editors and OS
.vscode/
.idea/
.DS_Store
*.swp

# Secrets
.env
*.pem
*.key
"""


class ProjectError(Ds01hubError, ValueError):
    """A project cannot be created as asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class ProjectSpec:
    """What the user asked for.

    ``name`` becomes the directory name; ``use_case`` is one of :data:`USE_CASES`;
    ``git`` runs ``git init`` (and an initial commit when ``initial_commit``);
    ``python_package`` creates ``src/<name>/__init__.py`` so notebooks can ``import`` it.
    """

    name: str
    description: str = ""
    use_case: str = "general"
    author: str = ""
    git: bool = True
    initial_commit: bool = True
    python_package: bool = True


@dataclass(frozen=True)
class ProjectPlan:
    """The pure result of planning: relative directories and files (path -> content)."""

    name: str
    directories: tuple[str, ...]
    files: Mapping[str, str]
    directory_purposes: Mapping[str, str]
    git: bool
    initial_commit: bool


@dataclass
class ProjectResult:
    """What :func:`init_project` did. Paths are absolute."""

    path: Path
    created_directories: list[Path] = field(default_factory=list)
    created_files: list[Path] = field(default_factory=list)
    kept_files: list[Path] = field(default_factory=list)
    git_initialized: bool = False
    git_committed: bool = False
    git_message: str = ""

    def to_dict(self) -> dict:
        """JSON-ready form (for ``--json`` and the HTTP handlers)."""
        return {
            "path": str(self.path),
            "created_directories": [str(p) for p in self.created_directories],
            "created_files": [str(p) for p in self.created_files],
            "kept_files": [str(p) for p in self.kept_files],
            "git_initialized": self.git_initialized,
            "git_committed": self.git_committed,
            "git_message": self.git_message,
        }

    def summary(self) -> str:
        """A few human lines for the CLI and the wizard."""
        if not self.created_directories and not self.created_files:
            lines = [f"Project already set up at {self.path}: nothing changed"]
        else:
            lines = [f"Project ready at {self.path}"]
            lines.append(
                f"  {len(self.created_directories)} directories and "
                f"{len(self.created_files)} files created"
            )
        if self.kept_files:
            kept = ", ".join(p.name for p in self.kept_files)
            lines.append(f"  kept existing files untouched: {kept}")
        if self.git_message:
            lines.append(f"  git: {self.git_message}")
        return "\n".join(lines)


def validate_project_name(name: str) -> str:
    """Return ``name`` if it is a usable project name, else raise :class:`ProjectError`.

    Names are letters, digits, ``.``, ``_`` and ``-``, start with a letter or digit and are at
    most 63 characters: safe as a directory name, a container name part and a hub server name.
    """
    if not isinstance(name, str) or not PROJECT_NAME_RE.match(name):
        raise ProjectError(
            f"invalid project name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (for example 'my-thesis')"
        )
    if name in {".", ".."} or name.endswith("."):
        raise ProjectError(f"invalid project name {name!r}: it must not end with '.'")
    return name


def python_package_name(project_name: str) -> str:
    """The importable package name for a project: ``my-thesis.v2`` -> ``my_thesis_v2``."""
    package = re.sub(r"[^0-9a-zA-Z_]", "_", project_name).lower()
    return f"p_{package}" if package[0].isdigit() else package


def validate_use_case(use_case: str) -> str:
    if use_case not in USE_CASES:
        choices = ", ".join(USE_CASES)
        raise ProjectError(f"unknown use case {use_case!r}: choose one of {choices}")
    return use_case


def directory_purposes(use_case: str = "general") -> dict[str, str]:
    """Directories of a project of this use case, each with why it exists."""
    return {**BASE_DIRECTORIES, **USE_CASE_DIRECTORIES.get(validate_use_case(use_case), {})}


def render_readme(spec: ProjectSpec, purposes: Mapping[str, str]) -> str:
    """The project's README.md: title, description, use case, layout and how to start."""
    description = spec.description.strip() or "_Describe the goal of this project here._"
    layout = "\n".join(f"| `{path}/` | {why} |" for path, why in purposes.items())
    author = f"\nAuthor: {spec.author.strip()}\n" if spec.author.strip() else ""
    package_hint = ""
    if spec.python_package:
        package = python_package_name(spec.name)
        package_hint = (
            f"\nReusable code lives in `src/{package}/`; from a notebook in `notebooks/`:\n\n"
            "```python\nimport sys; sys.path.insert(0, '../src')\n"
            f"import {package}\n```\n"
        )
    return (
        f"# {spec.name}\n\n{description}\n{author}\n"
        f"Use case: {USE_CASES[spec.use_case]}\n\n"
        "## Layout\n\n| directory | what goes there |\n|---|---|\n"
        f"{layout}\n{package_hint}\n"
        "## Data\n\nData and model weights are not committed to git (see `.gitignore`). "
        "Write down here where the raw data comes from and how to fetch it.\n"
    )


def plan_project(spec: ProjectSpec) -> ProjectPlan:
    """Validate ``spec`` and return what the project will consist of (pure)."""
    validate_project_name(spec.name)
    purposes = directory_purposes(spec.use_case)
    files: dict[str, str] = {
        "README.md": render_readme(spec, purposes),
        ".gitignore": ML_GITIGNORE,
        "requirements.txt": "# Python packages this project needs, one per line\n",
    }
    # Keep otherwise empty directories in git (ignored ones do not need it).
    for directory in purposes:
        if not _ignored_by_default(directory):
            files[f"{directory}/.gitkeep"] = ""
    if spec.python_package:
        package = python_package_name(spec.name)
        files[f"src/{package}/__init__.py"] = f'"""{spec.name}: project code."""\n'
        files.pop("src/.gitkeep", None)
    return ProjectPlan(
        name=spec.name,
        directories=tuple(purposes),
        files=files,
        directory_purposes=purposes,
        git=spec.git,
        initial_commit=spec.git and spec.initial_commit,
    )


def _ignored_by_default(directory: str) -> bool:
    ignored = {line.rstrip("/") for line in ML_GITIGNORE.splitlines() if line.endswith("/")}
    return directory in ignored


def init_project(
    spec: ProjectSpec, parent: str | os.PathLike, *, git_binary: str = "git"
) -> ProjectResult:
    """Create the project ``spec.name`` under ``parent`` and return what was done.

    Safe to re-run: existing files are never overwritten (they are listed in ``kept_files``)
    and an existing git repository is left as it is. Everything is checked before anything is
    written: an invalid name, a missing parent, a file in the way or a missing ``git`` raise
    :class:`ProjectError` with nothing created.
    """
    plan = plan_project(spec)
    parent_path = Path(parent).expanduser()
    if not parent_path.is_dir():
        raise ProjectError(f"parent directory {parent_path} does not exist: create it first")
    root = parent_path / plan.name
    _check_no_file_in_the_way(root, plan)
    git = shutil.which(git_binary) if plan.git else None
    if plan.git and git is None:
        raise ProjectError(
            f"'{git_binary}' was not found on PATH: install git, or create the project "
            "without git (git=False / --no-git)"
        )
    result = ProjectResult(path=root.resolve())
    _write_plan(root, plan, result)
    if git is not None:
        _git_init(git, root, plan, spec, result)
    return result


def _check_no_file_in_the_way(root: Path, plan: ProjectPlan) -> None:
    """Raise if a planned directory (or the project root) exists as a non-directory."""
    for relative in ("", *plan.directories, *(str(Path(f).parent) for f in plan.files)):
        candidate = root / relative if relative not in {"", "."} else root
        if candidate.exists() and not candidate.is_dir():
            raise ProjectError(
                f"{candidate} exists and is not a directory: move it away or pick another "
                "project name"
            )
    for relative in plan.files:
        if (root / relative).is_dir():
            raise ProjectError(
                f"{root / relative} is a directory where a file belongs: move it away"
            )


def _write_plan(root: Path, plan: ProjectPlan, result: ProjectResult) -> None:
    directories = [root, *(root / d for d in plan.directories)]
    directories += [root / Path(f).parent for f in plan.files]
    for directory in dict.fromkeys(directories):
        if not directory.exists():
            directory.mkdir(parents=True)
            result.created_directories.append(directory.resolve())
    for relative, content in plan.files.items():
        target = root / relative
        try:
            with open(target, "x", encoding="utf-8") as handle:
                handle.write(content)
        except FileExistsError:
            result.kept_files.append(target.resolve())
        else:
            result.created_files.append(target.resolve())


def _git_init(
    git: str, root: Path, plan: ProjectPlan, spec: ProjectSpec, result: ProjectResult
) -> None:
    if (root / ".git").exists():
        result.git_message = "existing repository left as it is"
        return
    _run_git(git, root, "init", "--quiet")
    result.git_initialized = True
    result.git_message = "initialised an empty repository"
    if not plan.initial_commit:
        return
    _run_git(git, root, "add", "--all")
    identity = _commit_identity(git, root, spec.author)
    _run_git(git, root, *identity, "commit", "--quiet", "-m", f"Initialise project {plan.name}")
    result.git_committed = True
    result.git_message = "initialised a repository with an initial commit"


def _commit_identity(git: str, root: Path, author: str) -> list[str]:
    """``-c user.name=... -c user.email=...`` when git has no identity configured.

    A fresh container has no ``~/.gitconfig``; the first commit should not fail for that.
    """
    configured = subprocess.run(
        [git, "config", "user.email"], cwd=root, capture_output=True, text=True, check=False
    )
    if configured.returncode == 0 and configured.stdout.strip():
        return []
    login = os.environ.get("JUPYTERHUB_USER") or os.environ.get("USER") or "ds01-user"
    name = author.strip() or login
    return ["-c", f"user.name={name}", "-c", f"user.email={login}@localhost"]


def _run_git(git: str, root: Path, *args: str) -> None:
    completed = subprocess.run([git, *args], cwd=root, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        command = " ".join(["git", *args])
        raise ProjectError(
            f"'{command}' failed in {root}: {completed.stderr.strip() or completed.stdout.strip()}"
            " (the project files were written; run git yourself to finish)"
        )
