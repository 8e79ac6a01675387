"""`dreambooth studio`: the studio's app on one socket, loopback only unless API keys are given (as `serve`)."""

from __future__ import annotations

from pathlib import Path

from dreambooth.errors import UserError


def check_installed() -> None:
    missing = []
    for module in ("fastapi", "uvicorn"):  # photos arrive as raw request bodies: no multipart parser needed
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"`dreambooth studio` needs {', '.join(missing)}: install the serve extra, `pip install "
                        "'dreambooth[serve]'` (or `pip install -e '.[serve]'` in a clone).")


def studio_command(options) -> None:
    """`dreambooth studio`: `options` is a command_options.StudioOptions."""
    check_installed()
    import uvicorn

    from dreambooth.serving.auth import load_keys, local_names
    from dreambooth.serving.command import is_loopback, listening_socket
    from dreambooth.studio.app import Access, create_studio
    from dreambooth.studio.projects import Projects
    from dreambooth.studio.runs import RunManager

    keys = load_keys(options.api_keys)
    if not keys and not is_loopback(options.host):
        raise UserError(f"--host {options.host} is reachable from other machines, and the studio runs training and "
                        "writes files for whoever reaches it: give --api-keys FILE (or $DREAMBOOTH_API_KEYS), or "
                        "keep the default loopback host.")
    projects = Path(options.projects)
    if projects.exists() and not projects.is_dir():
        raise UserError(f"--projects {projects} is a file, not a folder: give the folder that holds (or will hold) the "
                        "studio's projects; a new path is made.")
    projects.mkdir(parents=True, exist_ok=True)
    sock = listening_socket(options.host, options.port)
    limit = int(options.max_upload_mb * 1024 * 1024)
    # without keys, only requests addressed to this machine (app.Guard: a rebound name of another site is refused)
    hosts = () if keys else local_names(options.host)
    app = create_studio(Access(keys, hosts), max_upload_bytes=limit, models_dir=options.models_dir,
                        projects=Projects(options.projects, max_upload_bytes=limit),
                        runs=RunManager(Path(options.projects) / ".studio", clip=options.clip,
                                            dino=options.dino))
    port = sock.getsockname()[1]
    sock.listen(128)
    print(f"studio at http://{options.host}:{port}/ (projects in {options.projects}). Ctrl-C stops it; runs it "
          "started go on.", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
