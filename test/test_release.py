"""Releasing: .ci/version in throwaway git repositories, the workflows, the Makefile."""

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION_SCRIPT = ROOT / ".ci" / "version"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))


def _load_version_module():
    """Import .ci/version (a script without .py) as a module."""
    loader = importlib.machinery.SourceFileLoader("ci_version", str(VERSION_SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


version = _load_version_module()


def _executable(name):
    """Return the path of a tool, preferring the one next to this Python."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


# ---------------------------------------------------------------- pure logic


@pytest.mark.parametrize(
    "tag, commits_since, expected",
    [
        (None, 1, "0.0.1-next.1"),
        (None, 42, "0.0.1-next.42"),
        ("v1.2.3", 0, "1.2.3"),
        ("v1.2.3", 1, "1.2.4-next.1"),
        ("v1.2.3", 17, "1.2.4-next.17"),
        ("v0.0.0", 3, "0.0.1-next.3"),
        ("v10.20.30", 0, "10.20.30"),
    ],
)
def test_version_from_git(tag, commits_since, expected):
    assert version.version_from_git(tag, commits_since) == expected


@pytest.mark.parametrize(
    "tag, commits_since, expected",
    [
        ("v1.2.3", 0, "1.2.4-next.0"),
        ("v1.2.3", 3, "1.2.4-next.3"),
        (None, 3, "0.0.1-next.3"),
    ],
)
def test_version_from_git_for_the_next_channel(tag, commits_since, expected):
    assert version.version_from_git(tag, commits_since, prerelease=True) == expected


@pytest.mark.parametrize("tag, commits_since", [(None, 0), ("v1.2.3", -1)])
def test_version_from_git_rejects_impossible_counts(tag, commits_since):
    with pytest.raises(ValueError):
        version.version_from_git(tag, commits_since)


@pytest.mark.parametrize(
    "tag, expected",
    [
        ("v0.0.0", (0, 0, 0)),
        ("v1.2.3", (1, 2, 3)),
        ("v10.0.20", (10, 0, 20)),
        ("1.2.3", None),
        ("v1.2", None),
        ("v1.2.3.4", None),
        ("v01.2.3", None),
        ("v1.02.3", None),
        ("v1.2.0-rc.1", None),
        ("v1.2.3+build.5", None),
        ("V1.2.3", None),
        ("v1.2.3r", None),
        ("latest", None),
        ("version-1", None),
    ],
)
def test_parse_release_tag(tag, expected):
    assert version.parse_release_tag(tag) == expected


def test_last_release_tag_is_the_highest_by_semver():
    tags = ["v1.9.0", "v1.10.0", "v1.2.0-rc.1", "v2.0.0-rc.1", "latest", "v1.10"]
    assert version.last_release_tag(tags) == "v1.10.0"
    assert version.last_release_tag(["latest", "v1.0.0-rc.1"]) is None
    assert version.last_release_tag([]) is None


def _semver_key(text):
    """SemVer precedence for X.Y.Z[-PRE] (enough for the versions made here)."""
    release, _, prerelease = text.partition("-")
    identifiers = (
        [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in prerelease.split(".")]
        if prerelease
        else []
    )
    # A release ranks above all of its prereleases.
    return tuple(int(part) for part in release.split(".")), not prerelease, identifiers


def test_prereleases_sort_between_the_release_they_follow_and_the_next():
    made = [
        version.version_from_git(None, 1),
        version.version_from_git(None, 2),
        version.version_from_git(None, 10),
        version.version_from_git("v0.0.1", 0),
        version.version_from_git("v0.0.1", 0, prerelease=True),
        version.version_from_git("v0.0.1", 1),
        version.version_from_git("v0.0.1", 9),
        version.version_from_git("v0.0.1", 10),
        version.version_from_git("v0.0.2", 0),
        version.version_from_git("v0.1.0", 0),
    ]
    assert sorted(made, key=_semver_key) == made
    assert len(set(made)) == len(made)
    assert not any("+" in text for text in made)


# ------------------------------------------------------- throwaway repositories


class Repo:
    """A throwaway git repository with commits and tags made on demand."""

    def __init__(self, path):
        self.path = path
        self.env = {
            **os.environ,
            "HOME": str(path.parent),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_AUTHOR_NAME": "Test",
            "GIT_AUTHOR_EMAIL": "test@example.invalid",
            "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.invalid",
        }
        path.mkdir()
        self.git("init", "-q", "-b", "main")
        self.commits = 0

    def git(self, *args):
        """Run git in the repository and return its output."""
        return subprocess.run(
            ["git", *args],
            cwd=self.path,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def commit(self, count=1):
        """Make count empty commits."""
        for _ in range(count):
            self.commits += 1
            self.git("commit", "-q", "--allow-empty", "-m", f"commit {self.commits}")

    def tag(self, name, annotated=False):
        """Tag HEAD, lightweight or annotated."""
        self.git("tag", *(["-a", "-m", name] if annotated else []), name)

    def version(self, *args, script=None):
        """Run .ci/version in the repository and return the completed process."""
        command = [script] if script else [sys.executable, str(VERSION_SCRIPT)]
        return subprocess.run(
            [*command, *args],
            cwd=self.path,
            env=self.env,
            capture_output=True,
            text=True,
        )


@pytest.fixture
def repo(tmp_path):
    return Repo(tmp_path / "repo")


def _version(repo, *args):
    result = repo.version(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.strip()


def test_no_tag_yet_starts_from_0_0_0(repo):
    repo.commit()
    assert _version(repo) == "0.0.1-next.1"
    repo.commit(2)
    assert _version(repo) == "0.0.1-next.3"


def test_on_a_release_tag_the_version_is_the_tag(repo):
    repo.commit(3)
    repo.tag("v1.2.3")
    assert _version(repo) == "1.2.3"


def test_the_next_channel_stays_a_prerelease_on_a_release_tag(repo):
    repo.commit()
    repo.tag("v1.2.3")
    assert _version(repo, "--next") == "1.2.4-next.0"
    repo.commit()
    assert _version(repo, "--next") == _version(repo) == "1.2.4-next.1"


def test_an_unknown_argument_is_a_usage_error(repo):
    repo.commit()
    result = repo.version("--bogus")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: ")


def test_on_an_annotated_release_tag_the_version_is_the_tag(repo):
    repo.commit()
    repo.tag("v0.4.0", annotated=True)
    assert _version(repo) == "0.4.0"
    repo.commit()
    assert _version(repo) == "0.4.1-next.1"


def test_after_a_release_tag_commits_are_counted(repo):
    repo.commit()
    repo.tag("v1.2.3")
    repo.commit()
    assert _version(repo) == "1.2.4-next.1"
    repo.commit(4)
    assert _version(repo) == "1.2.4-next.5"
    repo.tag("v1.3.0")
    assert _version(repo) == "1.3.0"
    repo.commit()
    assert _version(repo) == "1.3.1-next.1"


def test_tags_that_are_not_release_tags_are_ignored(repo):
    repo.commit()
    repo.tag("v1.0.0")
    repo.commit()
    for name in ["latest", "next", "v2", "v2.0", "2.0.0", "v02.0.0", "v2.0.0.1", "release-2"]:
        repo.tag(name)
    assert _version(repo) == "1.0.1-next.1"


def test_a_prerelease_tag_is_ignored(repo):
    repo.commit()
    repo.tag("v1.1.0")
    repo.commit(2)
    repo.tag("v1.2.0-rc.1")
    assert _version(repo) == "1.1.1-next.2"
    repo.commit()
    assert _version(repo) == "1.1.1-next.3"


def test_the_highest_reachable_release_tag_counts(repo):
    repo.commit()
    repo.tag("v1.10.0")
    repo.commit()
    repo.tag("v1.9.0")
    repo.commit()
    assert _version(repo) == "1.10.1-next.2"


def test_tags_on_other_branches_are_ignored(repo):
    repo.commit()
    repo.tag("v1.0.0")
    repo.git("checkout", "-q", "-b", "other")
    repo.commit()
    repo.tag("v9.0.0")
    repo.git("checkout", "-q", "main")
    repo.commit(2)
    assert _version(repo) == "1.0.1-next.2"


def test_merged_commits_are_counted(repo):
    repo.commit()
    repo.tag("v1.0.0")
    repo.git("checkout", "-q", "-b", "feature")
    repo.commit(2)
    repo.git("checkout", "-q", "main")
    repo.commit()
    repo.git("merge", "-q", "--no-ff", "-m", "merge", "feature")
    # The two feature commits, the one on main and the merge commit.
    assert _version(repo) == "1.0.1-next.4"


def test_a_shallow_clone_is_an_error(repo, tmp_path):
    repo.commit(3)
    repo.tag("v1.0.0")
    repo.commit(2)
    shallow = tmp_path / "shallow"
    repo.git("clone", "-q", "--depth=1", f"file://{repo.path}", str(shallow))
    result = subprocess.run(
        [sys.executable, str(VERSION_SCRIPT)],
        cwd=shallow,
        env=repo.env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("version: error: shallow clone")


def test_outside_a_repository_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(VERSION_SCRIPT)],
        cwd=tmp_path,
        env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("version: error: git ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_script_runs_by_itself(repo):
    assert os.access(VERSION_SCRIPT, os.X_OK)
    repo.commit()
    repo.tag("v3.2.1")
    result = repo.version(script=str(VERSION_SCRIPT))
    assert (result.returncode, result.stdout) == (0, "3.2.1\n")


# ------------------------------------------------------------------ Makefile


def test_make_image_builds_with_the_computed_version(repo):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    (repo.path / ".ci").mkdir()
    shutil.copy2(VERSION_SCRIPT, repo.path / ".ci" / "version")
    shutil.copy2(ROOT / "Makefile", repo.path / "Makefile")
    repo.git("add", ".")
    repo.commit()
    repo.tag("v1.4.2")
    repo.commit(2)
    dry_run = subprocess.run(
        [make, "-n", "image"],
        cwd=repo.path,
        env=repo.env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert (
        "docker build --build-arg VERSION=1.4.3-next.2 -t atomist/k8svent:1.4.3-next.2 ."
        in dry_run.splitlines()
    )
    printed = subprocess.run(
        [make, "-s", "version"],
        cwd=repo.path,
        env=repo.env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert printed == "1.4.3-next.2\n"


# ----------------------------------------------------------------- workflows


def test_there_are_workflows():
    assert WORKFLOWS, "no files in .github/workflows/"


def test_workflows_match_the_github_schema():
    tool = _executable("check-jsonschema")
    if tool is None:
        pytest.fail("check-jsonschema is missing: pip install -r requirements-dev.txt")
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_pass_actionlint():
    tool = _executable("actionlint")
    if tool is None:
        pytest.skip("actionlint is not installed")
    result = subprocess.run(
        [tool, "-no-color", *map(str, WORKFLOWS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
