"""The deploy files (deploy/Dockerfile, deploy/Dockerfile.cuda, deploy/kubernetes/rayservice.yaml, deploy/README.md)
read against what they describe: the README's install, the real `dreambooth serve` parser, Ray Serve application
builder and deployment settings, and each other. No Docker and no cluster: the files are parsed, not built or applied.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from dreambooth.cli import COMMANDS, build_parser, command_options
from dreambooth.options import parse_settings
from dreambooth.serving import ray_app
from dreambooth.serving.app import ENDPOINTS
from dreambooth.serving.auth import ENVIRONMENT as KEYS_VARIABLE
from dreambooth.serving.command import is_loopback

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CPU, CUDA = DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"
MANIFEST = DEPLOY / "kubernetes" / "rayservice.yaml"
HEALTH = "/healthz"


# ------------------------------------------------------------------------------------------------ reading the files
def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, the rest), continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def only(path: Path, keyword: str) -> str:
    found = [rest for word, rest in instructions(path) if word == keyword]
    assert len(found) == 1, f"{path.name}: {len(found)} {keyword} instructions"
    return found[0]


def build_args(path: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions(path) if word == "ARG" and "=" in rest)


def pip_installs(path: Path) -> list[list[str]]:
    """The words of each `pip install` the image runs, in order, build args at their defaults."""
    args = build_args(path)
    commands = []
    for word, rest in instructions(path):
        if word != "RUN":
            continue
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest)
        for command in rest.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                commands.append([w for w in words[2:] if w != "-q"])
    return commands


def readme_pip_installs(text: str) -> list[list[str]]:
    """The `pip install` commands of a shell text (README's set-up line, .ci/run), their pip's path dropped."""
    commands = []
    for command in re.split(r"&&|\n", text):
        words = shlex.split(command, comments=True)
        for i in range(len(words) - 1):
            if Path(words[i]).name == "pip" and words[i + 1] == "install":
                commands.append([w for w in words[i + 2:] if w not in ("-q", "--quiet")])
            elif words[i:i + 4] == ["python", "-m", "pip", "install"]:
                commands.append([w for w in words[i + 4:] if w not in ("-q", "--quiet")])
    return commands


def readme_installs() -> list[list[str]]:
    """The README's set-up commands' `pip install`s: torch, then the package."""
    block = re.search(r"## Set-up.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return readme_pip_installs(block)


def torch_requirement(command: list[str]) -> str | None:
    return next((w for w in command if re.fullmatch(r"torch(==.*)?", w)), None)


def extras(command: list[str]) -> set[str]:
    target = next(w for w in command if w.startswith("."))
    match = re.fullmatch(r"\.\[([\w,]+)\]", target)
    return set(match.group(1).split(",")) if match else set()


def serve_options(argv: list[str]):
    """`argv` (after `dreambooth`) through the command line's own parser, as `dreambooth serve` reads it."""
    assert argv[0] == "serve"
    parser = build_parser()
    return command_options(COMMANDS["serve"], parser.parse_args(argv), parser.subcommand("serve"))


def image_command(path: Path) -> list[str]:
    return json.loads(only(path, "ENTRYPOINT")) + json.loads(only(path, "CMD"))


def documented_builds() -> dict[str, str]:
    """deploy/README.md's `docker build` lines: Dockerfile -> the tag it is built as."""
    builds = {}
    for line in (DEPLOY / "README.md").read_text().splitlines():
        if line.startswith("docker build"):
            words = shlex.split(line)
            builds[words[words.index("-f") + 1]] = words[words.index("-t") + 1]
    return builds


def documented_commands() -> list[list[str]]:
    """deploy/README.md's `docker run` commands (continued lines joined), each as its words."""
    text = (DEPLOY / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.startswith("docker run --rm")]


def documented_runs() -> dict[str, list[str]]:
    """deploy/README.md's `docker run` lines of the image's own command (`serve`): image -> the line's words."""
    return {words[-1]: words for words in documented_commands() if words[-1].startswith("dreambooth:")}


def manifest() -> list[dict]:
    return list(yaml.safe_load_all(MANIFEST.read_text()))


def of_kind(kind: str) -> list[dict]:
    return [doc for doc in manifest() if doc["kind"] == kind]


def rayservice() -> dict:
    (service,) = of_kind("RayService")
    return service


def serve_config() -> dict:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def application() -> dict:
    (app,) = serve_config()["applications"]
    return app


def app_options():
    return ray_app.options_from_args(application()["args"])


def ray_groups() -> list[tuple[str, dict]]:
    """(group name, its spec) for the head and each worker group."""
    cluster = rayservice()["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container


def workers() -> list[dict]:
    return rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def port_number(container: dict, port) -> int:
    """A probe's port, a number or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == port)


def probes(container: dict) -> dict[str, dict]:
    return {kind: container[kind] for kind in ("readinessProbe", "livenessProbe", "startupProbe") if kind in container}


def pyproject_keys(section: str) -> dict[str, str]:
    """The `key = value` lines of one pyproject.toml table (by hand: tomllib is Python 3.11's, the package 3.10's)."""
    text = (ROOT / "pyproject.toml").read_text()
    body = re.search(rf"^\[{re.escape(section)}\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S).group(1)
    return dict(re.findall(r"^([\w.-]+) = (.*)$", body, re.M))


def pinned(requirement: str, text: str) -> str:
    (version,) = re.findall(rf"^{re.escape(requirement)}==(\S+)$", text, flags=re.M)
    return version


# --------------------------------------------------------------------------------------------------- the images
def test_the_images_install_torch_as_the_readme_and_ci_do():
    readme, ci = readme_installs(), readme_pip_installs((ROOT / ".ci" / "run").read_text())
    pin = torch_requirement(readme[0])
    assert pin and pin.startswith("torch=="), f"README's first install is {readme[0]}"
    assert torch_requirement(next(c for c in ci if torch_requirement(c))) == pin

    cpu = pip_installs(CPU)
    assert torch_requirement(cpu[0]) == torch_requirement(readme[0]) == pin, "the CPU image's torch is the README's"
    # from PyTorch's CPU index: PyPI's Linux wheels of the same version are CUDA builds
    assert cpu[0][cpu[0].index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    cuda = pip_installs(CUDA)
    assert torch_requirement(cuda[0]) == pin, "the CUDA image's torch is the README's version"
    index = cuda[0][cuda[0].index("--index-url") + 1]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index


@pytest.mark.parametrize("dockerfile", [CPU, CUDA], ids=["cpu", "cuda"])
def test_the_images_install_the_package_with_the_constraints_and_the_service_extras(dockerfile):
    readme_package = readme_installs()[1]
    installs = pip_installs(dockerfile)
    assert len(installs) == 2 and torch_requirement(installs[0]), "torch first, then the package, as the README"
    package = installs[1]
    constraints = package[package.index("-c") + 1]
    assert constraints == readme_package[readme_package.index("-c") + 1] == "constraints.txt"
    assert torch_requirement(package) is None
    assert {"serve", "ray"} <= extras(package) <= set(pyproject_keys("project.optional-dependencies"))


@pytest.mark.parametrize("dockerfile", [CPU, CUDA], ids=["cpu", "cuda"])
def test_the_build_context_holds_what_the_image_copies(dockerfile):
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = [word for word, rest in instructions(dockerfile) if word == "COPY" for word in shlex.split(rest)[:-1]]
    assert {"pyproject.toml", "constraints.txt", "README.md", "src"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not [p for p in ignored if fnmatch.fnmatch(source, p) or fnmatch.fnmatch(source, p.lstrip("*/"))], \
            f".dockerignore leaves {source} out of the build context"
    assert {".git", ".venv"} <= set(ignored)


def test_the_two_images_differ_only_in_their_base_and_torch():
    def after_torch(path):
        steps = instructions(path)
        torch_at = next(i for i, (word, rest) in enumerate(steps) if word == "RUN" and "torch==" in rest)
        return steps[torch_at + 1:]

    assert after_torch(CPU) == after_torch(CUDA)
    assert only(CPU, "FROM") == "python:3.11-slim"
    assert build_args(CUDA)["CUDA_IMAGE"].startswith("nvidia/cuda:")


@pytest.mark.parametrize("dockerfile", [CPU, CUDA], ids=["cpu", "cuda"])
def test_the_images_run_dreambooth_from_the_environment_pip_installs_into(dockerfile):
    steps = instructions(dockerfile)
    venv = next(shlex.split(rest)[-1] for word, rest in steps if word == "RUN" and "-m venv" in rest)
    path = next(rest for word, rest in steps if word == "ENV" and rest.startswith("PATH="))
    assert path.startswith(f"PATH={venv}/bin:"), "pip, dreambooth and ray (KubeRay's `ray start`) come from the venv"
    assert json.loads(only(dockerfile, "ENTRYPOINT")) == ["dreambooth"]
    assert "dreambooth" in pyproject_keys("project.scripts")
    user = only(dockerfile, "USER")
    assert user not in ("root", "0"), "the service does not run as root"


@pytest.mark.parametrize("dockerfile", [CPU, CUDA], ids=["cpu", "cuda"])
def test_the_images_command_is_a_serve_command_whose_port_and_health_check_agree(dockerfile):
    argv = image_command(dockerfile)[1:]
    options = serve_options(argv)
    assert "--port" in argv, "the port is given, not left to a default the EXPOSE could drift from"
    assert only(dockerfile, "EXPOSE").split() == [str(options.port)]

    check = only(dockerfile, "HEALTHCHECK")
    (url,) = re.findall(r"https?://[^'\"\s]+", check)
    parts = urlsplit(url)
    assert (parts.port, parts.path) == (options.port, HEALTH)
    assert is_loopback(parts.hostname)
    assert HEALTH in ENDPOINTS, "the service answers the health check's path"
    assert json.loads(check.split("CMD", 1)[1])[0] == "python", "slim has no curl: the check is Python's urllib"

    assert not is_loopback(options.host), "the image listens for other machines"
    assert options.api_keys is not None and not options.allow_no_auth, "a non-loopback host comes with keys"


def test_the_documented_docker_commands_build_and_run_what_the_files_say():
    builds = documented_builds()
    version = json.loads(pyproject_keys("project")["version"])
    assert builds == {"deploy/Dockerfile": f"dreambooth:{version}",
                      "deploy/Dockerfile.cuda": f"dreambooth:{version}-cuda"}
    for dockerfile, tag in builds.items():
        assert f"-t {tag}" in (ROOT / dockerfile).read_text(), "the Dockerfile's own comment names its tag"

    runs = documented_runs()
    assert set(runs) == set(builds.values()), "a docker run line for each image"
    options = serve_options(image_command(CPU)[1:])
    for words in runs.values():
        published = [words[i + 1] for i, w in enumerate(words) if w == "-p"]
        assert [p.split(":")[-1] for p in published] == [str(options.port)]
        mounts = [words[i + 1].split(":")[1] for i, w in enumerate(words) if w == "-v"]
        assert str(options.characters.parent) in mounts, "the characters' folder is mounted"
        assert str(options.api_keys) in mounts, "the key file is mounted where --api-keys reads it"


def test_the_documented_studio_command_runs_in_the_image_as_the_studio_parses_it():
    """The studio from the same image: its command parses with `dreambooth studio`'s own parser, the published port
    is its --port, the projects folder and the key file are mounted where it reads them, and another host has keys."""
    from dreambooth.command_options import StudioOptions

    studios = [words for words in documented_commands() if "studio" in words]
    assert studios, "deploy/README.md shows the studio's docker run"
    for words in studios:
        image = next(w for w in words if w.startswith("dreambooth:"))
        argv = words[words.index(image) + 1:]
        assert argv[0] == "studio"
        options = parse_settings(StudioOptions, argv[1:], "dreambooth studio")
        published = [words[i + 1] for i, w in enumerate(words) if w == "-p"]
        assert [p.split(":")[-1] for p in published] == [str(options.port)]
        mounts = [words[i + 1].split(":")[1] for i, w in enumerate(words) if w == "-v"]
        assert str(options.projects) in mounts and str(options.api_keys) in mounts
        assert options.host == "0.0.0.0" and options.api_keys is not None


# ------------------------------------------------------------------------------------------- the RayService manifest
def test_the_manifest_is_a_kuberay_rayservice():
    service = rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == pinned("ray", (ROOT / "constraints.txt").read_text()), \
        "the Ray the image installs (constraints.txt)"


def test_the_application_is_the_services_ray_builder_with_arguments_it_accepts():
    app = application()
    assert app["name"] == ray_app.APPLICATION and app["route_prefix"] == "/"
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert callable(builder)
    options = ray_app.options_from_args(app["args"])  # a UserError names any key `serve` has no option for
    assert ray_app.option_problems(dataclasses.replace(options, ray=True)) == [], "as the builder checks them"


def test_the_deployments_settings_are_what_the_builder_derives_from_the_args():
    deployments = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application()["deployments"]}
    assert set(deployments) == {ray_app.GATEWAY, ray_app.CHARACTERS}
    assert deployments[ray_app.CHARACTERS] == ray_app.deployment_settings(app_options())
    assert deployments[ray_app.GATEWAY] == ray_app.GATEWAY_SETTINGS


def test_the_gpu_workers_hold_the_most_replicas_the_service_scales_to():
    options = app_options()
    gpus, cpus = ray_app.gpus_per_replica(options), options.cpus_per_replica
    assert gpus > 0 and options.device == "cuda", "the manifest draws on GPUs"
    most = options.max_replicas or options.replicas
    fewest = options.min_replicas if options.max_replicas else options.replicas

    def per_pod(group, resource):
        value = str(ray_container(group)["resources"]["limits"].get(resource, 0))
        return float(value[:-1]) / 1000 if value.endswith("m") else float(value)  # "500m" is half a CPU

    capacity = sum(g["maxReplicas"] * int(per_pod(g, "nvidia.com/gpu") // gpus) for g in workers())
    assert capacity >= most, f"{most} replica(s) of {gpus:g} GPU(s) need that many GPUs in the worker groups"
    floor = sum(g["minReplicas"] * int(per_pod(g, "nvidia.com/gpu") // gpus) for g in workers())
    assert floor >= fewest
    for group in workers():
        assert per_pod(group, "nvidia.com/gpu") >= gpus and per_pod(group, "cpu") >= cpus, "a pod fits a replica"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    head = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in ray_container(head)["resources"]["limits"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no replica on the head"
    if options.max_replicas:
        assert rayservice()["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_the_probes_ask_healthz_on_the_port_serve_listens_on():
    config = serve_config()
    port = config["http_options"]["port"]
    assert config["http_options"]["host"] == "0.0.0.0"
    assert application()["args"].get("port", port) == port, "an args port would be another port than Serve's"
    for name, group in ray_groups():
        container = ray_container(group)
        assert port_number(container, "serve") == port, f"{name}: the container's serve port is Serve's"
        for kind, probe in probes(container).items():
            get = probe.get("httpGet")
            if get and get["path"] == HEALTH:
                assert port_number(container, get["port"]) == port, f"{name} {kind}"
    for group in workers():
        readiness = ray_container(group)["readinessProbe"]["httpGet"]
        assert readiness["path"] == HEALTH and port_number(ray_container(group), readiness["port"]) == port
        assert ray_container(group)["livenessProbe"]["httpGet"]["path"] != HEALTH, \
            "a replica loading its models is not a reason to restart its node"
    assert HEALTH in ENDPOINTS


def test_the_ray_pods_run_the_cuda_image_as_kuberay_starts_it():
    cuda_tag = documented_builds()["deploy/Dockerfile.cuda"]
    user = int(only(CUDA, "USER"))
    for name, group in ray_groups():
        container = ray_container(group)
        assert container["image"] == cuda_tag, f"{name}: one image, the CUDA one deploy/README.md builds"
        assert "command" not in container and "args" not in container, f"{name}: KubeRay runs `ray start`"
        security = group["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == user, f"{name}: the image's user"


def test_every_ray_pod_has_the_keys_a_non_loopback_host_needs_and_the_characters():
    options = app_options()
    assert not is_loopback(options.host), "a replica checks its keys only when its host is not loopback"
    assert not options.allow_no_auth
    for name, group in ray_groups():
        container = ray_container(group)
        (keys,) = [e for e in container["env"] if e["name"] == KEYS_VARIABLE]
        assert "value" not in keys and keys["valueFrom"]["secretKeyRef"]["name"], f"{name}: keys from a Secret"
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert any(options.characters.is_relative_to(m) for m in mounts), f"{name}: {options.characters} mounted"


def test_the_redis_the_replicas_share_is_the_one_the_manifest_runs():
    options = app_options()
    url = urlsplit(options.redis_url)
    (service,) = of_kind("Service")
    assert url.hostname == service["metadata"]["name"]
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    (deployment,) = of_kind("Deployment")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (redis,) = deployment["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    maxmemory = args[args.index("--maxmemory") + 1]
    assert int(maxmemory.removesuffix("mb")) > options.cache_mb, "room above the cache's bound (docs/serving.md)"
    assert options.cache_dir is None, "--cache-dir with --redis-url is refused"
