"""bench/gpu.sh's install step, on a machine with no network: the GPU machine it runs on reaches no index, so the
build backend (setuptools + wheel + packaging) must come from the carried wheels in .whl/, and this package installs
with --no-build-isolation --no-index. The slow test runs that step's own script, bench/install_offline.sh, in a fresh
virtual environment that sees the test's torch stack but no build backend and can reach no network."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "bench" / "install_offline.sh"
BUILD_WHEELS = ("setuptools", "wheel", "packaging")
# The discard port of this host: every connection is refused (or, in a network namespace, unreachable).
NOWHERE = "http://127.0.0.1:9"
# What the machine's Python must not already have (the build backend, so that only the carried wheels can provide
# it; pip, which the fresh environment brings itself; this package and its editable-install hooks) and .pth files
# (the view's folder is a plain path entry, whose .pth files Python would not run anyway).
NOT_ON_MACHINE = re.compile(
    r"^(setuptools|pkg_resources|_distutils_hack|wheel|packaging|pip|dreambooth)([-.].*)?$|^__editable__|\.pth$",
    re.IGNORECASE)


def test_gpu_sh_installs_through_the_shared_script_with_no_index():
    """The install commands live in one script, which gpu.sh runs and the slow test below runs offline: gpu.sh has
    no pip install of its own, and every pip call of the script has --no-index."""
    gpu = (REPO / "bench" / "gpu.sh").read_text()
    assert re.search(r"^step install \d+ bash bench/install_offline\.sh$", gpu, re.MULTILINE)
    assert "pip install" not in gpu
    calls = [line for line in INSTALL.read_text().splitlines() if re.search(r"\bpip\b", line)
             and not line.lstrip().startswith("#")]
    assert len(calls) == 2 and all("--no-index" in line for line in calls), calls
    assert "--no-build-isolation" in calls[-1] and "--no-deps" in calls[-1]


@pytest.fixture(scope="module")
def build_wheels(request, tmp_path_factory) -> Path:
    """setuptools, wheel and packaging as bench/carry_wheels.py --build-only downloads them (needs the index once;
    kept in pytest's cache when it is on)."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("offline-install-wheels") if cache is not None else tmp_path_factory.mktemp("wheels")
    have = {p.name.split("-")[0] for p in folder.glob("*.whl")}
    if not set(BUILD_WHEELS) <= have:
        done = subprocess.run([sys.executable, str(REPO / "bench" / "carry_wheels.py"), "--build-only", "--dest",
                               str(folder)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail("bench/carry_wheels.py --build-only could not download the build wheels (it needs the "
                        f"package index once):\n{done.stdout}{done.stderr}")
    return folder


def checkout_copy(folder: Path) -> Path:
    """What `pip install -e .` and the install script read, copied: the editable install then points there, and
    the checkout under test gets no build files."""
    shutil.copytree(REPO / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "bench/install_offline.sh"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, folder / name)
    return folder


def machine_venv(folder: Path, view: Path, env: dict[str, str]) -> Path:
    """A fresh virtual environment standing in for the GPU machine's Python: its own pip, no setuptools, and this
    interpreter's packages (torch, transformers, ...) seen through `view`, a folder of links to them minus
    NOT_ON_MACHINE. (venv --system-site-packages would show the base interpreter's packages, not this one's.)"""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, env=env, timeout=300)
    python = folder / "bin" / "python"
    # Python <= 3.11 puts setuptools into every new environment; the machine's 3.12 does not.
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, env=env, timeout=300)
    view.mkdir()
    for site in dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")):
        for entry in Path(site).iterdir():
            if not NOT_ON_MACHINE.search(entry.name) and not (view / entry.name).exists():
                (view / entry.name).symlink_to(entry)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, env=env, capture_output=True, text=True).stdout.strip()
    Path(purelib, "machine_packages.pth").write_text(f"{view}\n")
    return folder


def offline_env(venv: Path, home: Path) -> dict[str, str]:
    """The environment of every command below: the venv first on PATH; no pip setting from the outside (this
    machine's configuration adds local indexes and find-links, which could supply setuptools); the index and
    every proxy at a dead address, no retries, so that a network use fails at once."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("PIP_") and not k.lower().endswith("_proxy")
           and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    home.mkdir(exist_ok=True)
    env.update({"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", "HOME": str(home),
                "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": f"{NOWHERE}/simple", "PIP_RETRIES": "0",
                "PIP_TIMEOUT": "5", "PIP_ROOT_USER_ACTION": "ignore"})
    env.update({name: NOWHERE for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                                           "ALL_PROXY")})
    return env


def no_network_prefix() -> list[str]:
    """`unshare` into a user and network namespace (no interface but a loopback that is down) where the kernel
    allows it; elsewhere the environment's dead index and proxies are the only barrier."""
    command = ["unshare", "--user", "--map-root-user", "--net"]
    try:
        works = subprocess.run([*command, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    return command if works else []


@pytest.mark.slow
def test_install_step_works_offline_from_the_carried_wheels(build_wheels, tmp_path):
    repo = checkout_copy(tmp_path / "repo")
    env = offline_env(tmp_path / "venv", tmp_path / "home")
    venv = machine_venv(tmp_path / "venv", tmp_path / "machine-packages", env)
    prefix = no_network_prefix()

    def offline(*command: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *map(str, command)], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)

    # The barrier holds: a request to the real index fails from inside it.
    reach = offline(venv / "bin" / "python", "-c",
                    "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/pip/', timeout=10)")
    assert reach.returncode != 0 and "Error" in reach.stderr, reach.stderr

    # Without the carried wheels nothing provides the build backend, so the install fails ...
    without = offline("bash", repo / "bench" / "install_offline.sh")
    assert without.returncode != 0 and "No module named 'setuptools'" in without.stderr, without.stderr

    # ... and with them it installs, every pip call of the script still at --no-index.
    shutil.copytree(build_wheels, repo / ".whl")
    done = offline("bash", repo / "bench" / "install_offline.sh")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not re.search(r"Retrying|NewConnectionError|Looking in indexes", done.stdout + done.stderr)

    # The package imports from the copy through an editable install, built by the carried setuptools ...
    carried_setuptools = next(build_wheels.glob("setuptools-*.whl")).name.split("-")[1]
    probe = offline(venv / "bin" / "python", "-c",
                    "import dreambooth, importlib.metadata as m; print(dreambooth.__file__); "
                    "print(m.version('setuptools')); print(m.distribution('dreambooth').read_text('direct_url.json'))")
    assert probe.returncode == 0, probe.stderr
    module_file, setuptools_version, direct_url = probe.stdout.split("\n", 2)
    assert Path(module_file).resolve() == (repo / "src" / "dreambooth" / "__init__.py").resolve()
    assert setuptools_version == carried_setuptools
    assert '"editable": true' in direct_url and repo.resolve().as_uri() in direct_url, direct_url

    # ... and the console entry point runs.
    helped = offline(venv / "bin" / "dreambooth", "--help")
    assert helped.returncode == 0 and "usage: dreambooth" in helped.stdout, helped.stderr
