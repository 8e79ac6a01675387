"""The studio's "ship it": a project's result exported through `dreambooth export` (kohya, single file, diffusers, or a
LoRA merged into its base model), into PROJECT/exports/, with the file's size and place; and the result made a
character of the project's characters.yaml (what `dreambooth serve --characters` reads), checked as `serve` checks
it before the file is replaced."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from dreambooth.errors import UserError
from dreambooth.formats.atomic import write_text_atomic
from dreambooth.studio.trying import trained_model

SUFFIX = {"kohya": ".safetensors", "single-file": ".safetensors", "diffusers": ""}
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_result(project, *, format: str, result: str = "final", half: bool = False, merge: bool = False) -> dict:
    """The result written by `dreambooth export`'s own command into PROJECT/exports/NAME (a new name each time, so
    nothing exported before is replaced); `merge`: a LoRA result baked into its base model (diffusers or single
    file). Its path relative to the project and its size in bytes."""
    from dreambooth.command_options import ExportOptions
    from dreambooth.config_file import load_config
    from dreambooth.export import export_command

    if format not in SUFFIX:
        raise UserError(f"format {format!r}: choose kohya (a LoRA for A1111, Forge, ComfyUI), single-file (one "
                        ".safetensors model) or diffusers (a folder).")
    model, loras = trained_model(project, result)
    folder = model if not loras else loras[0][0].parent
    cfg = load_config(project.config_path)
    src, merge_lora = (Path(cfg.model.pretrained_model), [str(loras[0][0])]) if merge and loras else (folder, [])
    if merge and not loras:
        raise UserError(f"{project.name}'s {result} is a full model, with no LoRA to merge: export it as it is "
                        "(single-file or diffusers).")
    exports = project.path / "exports"
    exports.mkdir(exist_ok=True)
    stem = f"{project.name}-{result}-{format}{'-merged' if merge_lora else ''}{'-fp16' if half else ''}"
    out, n = exports / f"{stem}{SUFFIX[format]}", 1
    while out.exists():
        n += 1
        out = exports / f"{stem}-{n}{SUFFIX[format]}"
    written = export_command(ExportOptions(src=src, format=format, out=out, half=half, merge_lora=merge_lora))
    written = Path(written)
    return {"path": str(written.relative_to(project.path)), "bytes": size_of(written), "format": format,
            "result": result, "merged": bool(merge_lora)}


def add_character(project, name: str, result: str = "final") -> dict:
    """The result as a character of PROJECT/characters.yaml (added; an entry of the same name, or one that describes
    the same result, replaced): its model (the output folder, or the base with the LoRA), identifier and class word
    from the config; the file checked as `serve` checks it before it is written."""
    from dreambooth.characters.character import load_characters
    from dreambooth.config_file import load_config
    from dreambooth.models.base import LORA_FILE

    if not NAME.match(name):
        raise UserError(f"character name {name!r}: use 1-64 letters, digits, '-' or '_' (it is the name requests "
                        "give).")
    model, loras = trained_model(project, result)
    cfg = load_config(project.config_path)
    file = project.path / "characters.yaml"
    data = yaml.safe_load(file.read_text(encoding="utf-8")) if file.is_file() else None
    data = data if isinstance(data, dict) else {}
    result_folder = (model if not loras else loras[0][0].parent).resolve()

    def same_result(c: dict) -> bool:
        """An entry that describes this result already (init's `model: output`, or an earlier add): replaced, since
        the run may have changed what the folder holds (a LoRA where init expected a full model)."""
        places = [c.get("model")] + [lora.get("file") for lora in c.get("loras") or [] if isinstance(lora, dict)]
        return any(isinstance(p, str) and (project.path / p).resolve() in (result_folder, result_folder / LORA_FILE)
                   for p in places if p)

    characters = [c for c in data.get("characters") or []
                  if isinstance(c, dict) and c.get("name") != name and not same_result(c)]
    entry = {"name": name, "model": str(model), "identifier": cfg.token.identifier,
             "class_word": cfg.token.class_word or cfg.token.initializer}
    if loras:
        entry["loras"] = [{"file": str(path), "weight": weight} for path, weight in loras]
    characters.append(entry)
    text = yaml.safe_dump({**data, "characters": characters}, sort_keys=False, allow_unicode=True)
    check = file.with_name(".characters.check.yaml")
    try:
        check.write_text(text, encoding="utf-8")
        load_characters(check)  # every problem `serve` would find in the file, before it is replaced
    finally:
        check.unlink(missing_ok=True)
    write_text_atomic(file, text)
    return {"character": entry, "file": "characters.yaml"}


class Services:
    """`dreambooth serve` of each project's characters.yaml, started by the studio on a free loopback port (one per
    project), stopped with the studio; its address read from the line `serve` prints when it listens."""

    READY = re.compile(r"serving \d+ character\(s\) \([^)]*\) at (http://\S+/)")

    def __init__(self):
        self.running: dict[str, tuple[object, Path, str | None]] = {}  # project -> (process, its log, its URL)

    def start(self, project, timeout_s: float = 600.0) -> str:
        import subprocess
        import sys
        import time

        found = self.url(project)
        if found:
            return found
        file = project.path / "characters.yaml"
        if not file.is_file():
            raise UserError(f"{project.name} has no characters.yaml yet: add the result as a character first.")
        log = project.path / ".serve.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "dreambooth", "serve", "--characters", str(file),
                                        "--port", "0", "--cache-dir", str(project.path / ".serve-cache")],
                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=project.path)
        self.running[project.name] = (process, log, None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            match = self.READY.search(text)
            if match:
                self.running[project.name] = (process, log, match.group(1))
                return match.group(1)
            if process.poll() is not None:
                del self.running[project.name]
                lines = [line for line in text.splitlines() if line.strip()]
                raise UserError(f"`dreambooth serve` of {project.name}'s characters.yaml ended: "
                                + (lines[-1] if lines else f"exit status {process.returncode}"))
            time.sleep(0.2)
        self.stop(project)
        raise UserError(f"`dreambooth serve` of {project.name}'s characters.yaml did not listen within "
                        f"{timeout_s:g} s; its output is in {log}.")

    def url(self, project) -> str | None:
        entry = self.running.get(project.name)
        if entry is None or entry[0].poll() is not None:
            self.running.pop(project.name, None)
            return None
        return entry[2]

    def stop(self, project) -> bool:
        entry = self.running.pop(project.name, None)
        if entry is None:
            return False
        process = entry[0]
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except Exception:
                process.kill()
        return True

    def close(self) -> None:
        for process, _, _ in list(self.running.values()):
            if process.poll() is None:
                process.terminate()
        self.running.clear()


def push_result(project) -> dict:
    """The project's output uploaded to the Hugging Face hub as `train --push_to_hub` uploads it (training.hub: the
    token and the connection checked first, the repo the config names or USER/OUTPUT_NAME); the repo and its URL."""
    from dreambooth.config_file import load_config
    from dreambooth.training.hub import check_upload, upload_run

    trained_model(project, "final")  # a result to upload, or the message that says to train first
    cfg = load_config(project.config_path)
    repo = check_upload(cfg)
    return {"repo": repo, "url": upload_run(cfg, repo)}
