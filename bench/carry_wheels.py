"""Fills .whl/ with the wheels bench/gpu.sh's GPU machine lacks; that machine has no network, so they travel with
the checkout and bench/install_offline.sh installs them with --no-index.

    python bench/carry_wheels.py                  # diffusers, pydantic, PyYAML, pytest, prodigyopt, lion-pytorch,
                                                  # setuptools, wheel, packaging
    python bench/carry_wheels.py --bitsandbytes   # and bitsandbytes, for the lean-memory run (~43 MB)
    python bench/carry_wheels.py --build-only     # only setuptools + wheel + packaging (the editable install's needs)

The versions are what pip resolves for the machine's Python (3.12, CPython, manylinux x86_64) under constraints.txt:
its pins where it pins a package (diffusers, pydantic, PyYAML, pytest), and the exact versions those pins require
(pydantic_core is pinned by pydantic's own metadata). The resolution reads metadata only; the wheels are then
downloaded with `pip download --no-deps`, one exact version each. Carried: those packages and every dependency they
reach, except what the machine already has (ON_MACHINE: its torch stack, which gpu.sh's facts step imports, and the
dependencies diffusers shares with it); bench/install_offline.sh installs all carried wheels in one pip call, which
fails as a whole if one of them needs something neither carried nor there. bitsandbytes, prodigyopt and lion-pytorch
are downloaded without resolving (their one dependency is torch, which must never be resolved here: a multi-GB CUDA
build); the optimizers at their constraints.txt pins.

Leaves the folder holding exactly this set (other wheels there are removed) and prints each wheel's size and the
total against the 64 MiB that a device run carries (this checkout's tracked files travel too).
"""

from __future__ import annotations

import argparse
import email.parser
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent
# What bench/gpu.sh runs beside the build backend: diffusers (the machine has transformers, accelerate, peft, not
# diffusers), pydantic (the config), PyYAML (config files), pytest (the GPU tests).
RUNTIME = ["diffusers", "pydantic", "PyYAML", "pytest"]
# The optimizers of training.optimizer beyond torch's: pure Python, needing torch alone, so downloaded at their pins
# without resolving (resolving them would resolve torch).
TORCH_ONLY = ["prodigyopt", "lion-pytorch"]
# Beside [build-system]'s setuptools and wheel: wheel requires it, and setuptools imports an installed one before
# its own vendored copy.
BUILD_EXTRA = ["packaging"]
# Not carried, nor followed: the machine's torch stack and the dependencies of diffusers that it brings along.
ON_MACHINE = {canonicalize_name(n) for n in (
    "torch", "transformers", "accelerate", "peft", "huggingface_hub", "numpy", "safetensors", "Pillow", "requests",
    "filelock", "regex", "tqdm")}
TRAVEL_LIMIT_MIB = 64


def project_requirements() -> tuple[list[str], str]:
    """[build-system] requires (setuptools>=68, wheel) and the bnb extra's bitsandbytes range, from pyproject.toml."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    build = pyproject["build-system"]["requires"]
    bnb = next(r for r in pyproject["project"]["optional-dependencies"]["bnb"] if r.startswith("bitsandbytes"))
    return build, bnb


def constraint_pins() -> dict[str, str]:
    """constraints.txt's pins, by canonical name: {name: version}."""
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(line.split("==")[0]): line.split("==")[1].strip() for line in lines
            if "==" in line and not line.startswith("#")}


def target_options(python_version: str, glibc: str, arch: str) -> list[str]:
    """pip's options for another machine's wheels: binary only, its Python, every manylinux tag up to its glibc
    (pip does not widen a manylinux_2_X tag to the older ones by itself; manylinux2014 it widens to 2010 and 1)."""
    major, minor = (int(x) for x in glibc.split("."))
    platforms = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)] + [f"manylinux2014_{arch}"]
    options = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in platforms:
        options += ["--platform", platform]
    return options


def marker_environment(python_version: str, arch: str) -> dict[str, str]:
    return {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": arch, "os_name": "posix", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "extra": ""}


def pip(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"pip {args[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done


def resolve(roots: list[str], target: list[str]) -> dict[str, dict]:
    """name -> the report's metadata of what pip would install for the target from these roots (metadata only)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "--dry-run", "--ignore-installed", "--quiet", "--target", str(Path(tmp) / "never-written"),
            "--report", str(report), *target, "-c", str(REPO / "constraints.txt"), *roots)
        items = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in items}


def carried(roots: list[str], resolved: dict[str, dict], environment: dict[str, str]) -> tuple[list[str], list[str]]:
    """The roots and every dependency they reach for the target, short of ON_MACHINE, in the order reached; and
    what they require of the machine ("huggingface-hub<3.0,>=1.32.0 (diffusers)")."""
    order, queue, of_machine = [], [canonicalize_name(Requirement(r).name) for r in roots], []
    while queue:
        name = queue.pop(0)
        if name in order:
            continue
        order.append(name)
        for line in resolved[name].get("requires_dist", []):
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            if canonicalize_name(requirement.name) in ON_MACHINE:
                requirement.marker = None
                of_machine.append(f"{requirement} ({resolved[name]['name']})")
            else:
                queue.append(canonicalize_name(requirement.name))
    return order, of_machine


def wheel_requires(path: Path, environment: dict[str, str]) -> list[str]:
    """A wheel's Requires-Dist that apply to the target, markers dropped."""
    with zipfile.ZipFile(path) as wheel:
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(wheel.read(metadata).decode())
    requirements = [Requirement(line) for line in message.get_all("Requires-Dist") or []]
    kept = [r for r in requirements if r.marker is None or r.marker.evaluate(environment)]
    for requirement in kept:
        requirement.marker = None
    return [str(r) for r in kept]


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def tracked_size() -> int | None:
    """Bytes of this checkout's tracked files (they travel to the device machine with .whl/), or None without git."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((REPO / n).stat().st_size for n in names.decode().split("\0") if n and (REPO / n).is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=REPO / ".whl", help="the folder to fill (default: .whl/)")
    parser.add_argument("--bitsandbytes", action="store_true", help="also bitsandbytes (~43 MB), for --lean-memory")
    parser.add_argument("--build-only", action="store_true",
                        help="only setuptools, wheel and packaging: what `pip install --no-build-isolation -e .` needs")
    parser.add_argument("--python-version", default="3.12", help="the machine's Python (default 3.12)")
    parser.add_argument("--glibc", default="2.28", help="the machine's glibc, for manylinux tags (default 2.28)")
    parser.add_argument("--arch", default="x86_64")
    args = parser.parse_args()

    build, bnb = project_requirements()
    roots = build + BUILD_EXTRA + ([] if args.build_only else RUNTIME)
    target = target_options(args.python_version, args.glibc, args.arch)
    resolved = resolve(roots, target)
    environment = marker_environment(args.python_version, args.arch)
    names, of_machine = carried(roots, resolved, environment)
    pins = [f"{resolved[n]['name']}=={resolved[n]['version']}" for n in names]

    pinned = constraint_pins()
    versions = {n: resolved[n]["version"] for n in names}
    if not args.build_only:
        versions.update({canonicalize_name(n): pinned[canonicalize_name(n)] for n in TORCH_ONLY})
        pins += [f"{n}=={pinned[canonicalize_name(n)]}" for n in TORCH_ONLY]
        names += [canonicalize_name(n) for n in TORCH_ONLY]

    args.dest.mkdir(parents=True, exist_ok=True)
    pip("download", "--no-deps", "--quiet", "--dest", str(args.dest), *target, *pins)
    if args.bitsandbytes:
        pip("download", "--no-deps", "--quiet", "--dest", str(args.dest), *target, bnb)
        names.append(canonicalize_name("bitsandbytes"))

    # The folder holds exactly this set: an older wheel left beside a newer one would be installed too.
    # (bitsandbytes, not resolved: the newest there, which is the one just downloaded.)
    wheels = {}
    for path in sorted(args.dest.glob("*.whl"), key=lambda p: parse_wheel_filename(p.name)[1], reverse=True):
        name, version = parse_wheel_filename(path.name)[:2]
        exact = name == "bitsandbytes" or str(version) == versions[name] if name in names else False
        if exact and name not in wheels:
            wheels[name] = path
        else:
            path.unlink()
            print(f"removed {path.name} (not in this set)")
    missing = [n for n in names if n not in wheels]
    if missing:
        sys.exit(f"no wheel came for {missing}")

    print(f"{args.dest}: Python {args.python_version}, manylinux (glibc <= {args.glibc}) {args.arch}; versions from "
          "constraints.txt (*) or resolved under it")
    for name in names:
        label = f"{name} {parse_wheel_filename(wheels[name].name)[1]}"
        print(f"  {label:<28} {mib(wheels[name].stat().st_size):>9}{' *' if name in pinned else ''}")
    unresolved = (["bitsandbytes"] if args.bitsandbytes else []) + ([] if args.build_only else TORCH_ONLY)
    for root in map(canonicalize_name, unresolved):
        of_machine += [f"{line} ({root})" for line in wheel_requires(wheels[root], environment)
                       if canonicalize_name(Requirement(line).name) not in names]
    if of_machine:
        print("not carried, the machine must have: " + ", ".join(of_machine))

    total = sum(p.stat().st_size for p in wheels.values())
    bnb_size = wheels[canonicalize_name("bitsandbytes")].stat().st_size if args.bitsandbytes else 0
    tree = tracked_size()
    travel = total + (tree or 0)
    print(f"total: {len(wheels)} wheels, {mib(total)}"
          + (f" ({mib(total - bnb_size)} without bitsandbytes)" if args.bitsandbytes else ""))
    print(f"with the checkout's tracked files ({mib(tree) if tree is not None else 'unknown, no git'}): {mib(travel)} "
          f"of the {TRAVEL_LIMIT_MIB} MiB a device run carries: "
          + ("fits" if travel <= TRAVEL_LIMIT_MIB * 2**20 else "does NOT fit"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
