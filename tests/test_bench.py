"""`dreambooth bench` (bench/bench.py, developer tooling in the repository): the step timer counts every optimizer
step, a run reports every figure, the table builds, and the command finds the script or says where it lives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth import cli
from dreambooth.errors import UserError

bench = cli.load_script("bench/bench.py", "bench")  # as `dreambooth bench` loads it
TIMER_DIR, TIMES_ENV, BenchSettings = bench.TIMER_DIR, bench.TIMES_ENV, bench.BenchSettings
check_settings, figures, format_table, run_bench, train_flags, write_table = (
    bench.check_settings, bench.figures, bench.format_table, bench.run_bench, bench.train_flags, bench.write_table)

REQUIRED = ("device", "torch", "model", "method", "resolution", "precision", "steps", "s_per_step_median",
            "samples_per_s", "peak_mem_mb", "mfu", "wall_s", "peer", "speedup", "memory_ratio")
STEPS = 6

STEPPER = """
import torch
from accelerate import Accelerator

p = torch.nn.Parameter(torch.randn(4))
for kw in ({"foreach": True}, {"fused": True}, {"foreach": False}):
    opt = torch.optim.AdamW([p], lr=0.1, **kw)
    for _ in range(3):
        p.grad = torch.ones(4)
        opt.step()
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
model = torch.nn.Linear(2, 2)
model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), foreach=True))
for _ in range(4):  # two optimizer steps: accelerate skips the step on accumulation batches
    with accelerator.accumulate(model):
        accelerator.backward(model(torch.ones(1, 2)).sum())
        opt.step()
        opt.zero_grad()
"""


def test_timer_records_every_optimizer_step_of_an_unchanged_program(tmp_path):
    out = tmp_path / "times.json"
    env = {**os.environ, "PYTHONPATH": str(TIMER_DIR), TIMES_ENV: str(out)}
    subprocess.run([sys.executable, "-c", STEPPER], env=env, check=True, capture_output=True)
    record = json.loads(out.read_text())
    assert len(record["times"]) == 3 * 3 + 2  # for-loop, foreach and fused AdamW, and accelerate's real steps
    assert record["times"] == sorted(record["times"])
    assert len(record["rss_kb"]) == 11 and record["rss_kb_exit"] >= record["rss_kb"][-1] > 0
    assert len(record["cpu_times"]) == 11 and record["cpu_times"] == sorted(record["cpu_times"])


def test_a_process_without_optimizer_steps_writes_nothing(tmp_path):
    out = tmp_path / "times.json"
    env = {**os.environ, "PYTHONPATH": str(TIMER_DIR), TIMES_ENV: str(out)}
    subprocess.run([sys.executable, "-c", "import torch.optim"], env=env, check=True)
    assert not out.exists()


def test_step_time_is_the_median_difference_after_warmup():
    record = {"times": [0.0, 1.0, 2.0, 4.0, 5.0, 8.0], "rss_kb": [1024] * 6, "rss_kb_exit": 2048,
              "cuda_allocated": [], "wall_s": 12.0, "other_cpu_share": 0.01}
    # Steps 3..6 took 1, 2, 1, 3 s.
    f = figures(record, warmup=2, samples_per_step=2, flops=4e12, peak=None)
    assert f["s_per_step_median"] == 1.5
    assert f["samples_per_s"] == pytest.approx(2 / 1.5)
    assert (f["peak_mem_mb"], f["peak_mem_whole_run_mb"]) == (1.0, 2.0)
    assert f["mfu"] is None and f["tflops_per_s"] == pytest.approx(4 / 1.5)
    assert f["cpu_s_per_step_median"] is None  # a record from before the timer kept CPU times
    record["cpu_times"] = [0.0, 2.0, 4.0, 6.0, 7.0, 9.0]  # steps 3..6 used 2, 2, 1, 2 CPU seconds
    assert figures(record, warmup=2, samples_per_step=2, flops=None, peak=None)["cpu_s_per_step_median"] == 2.0


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bench_reports_every_figure_from_exactly_the_steps_run(bench_dir, method):
    """The LoRA bench makes its class images inside every timed run (--fresh-class-images, twice), the full one
    before them: one bench each, which is most of the file's time."""
    fresh = method == "lora"
    s = BenchSettings(model="tiny", method=method, steps=STEPS, warmup=2, num_class_images=2,
                      repeats=2 if fresh else 1, fresh_class_images=fresh, out=bench_dir / "work",
                      results=bench_dir / "results")
    result = run_bench(s)
    name = f"cpu-tiny-{method}-64-no" + ("-fresh" if fresh else "")
    path = bench_dir / "results" / f"{name}.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert set(REQUIRED) <= set(result)
    assert result["timed_steps"] == STEPS  # the timer saw every optimizer step of the training process
    for key in ("s_per_step_median", "samples_per_s", "peak_mem_mb", "wall_s", "flops_per_step"):
        assert result[key] > 0, key
    assert result["mfu"] is None and result["peer"] is None  # CPU, no peer
    assert (result["device"], result["model"], result["method"], result["resolution"]) == ("cpu", "tiny", method, 64)
    assert "--with_prior_preservation" in result["commands"]["ours"]
    log = (bench_dir / "results" / f"{name}.ours.log").read_text()
    assert "training" in log
    assert not (bench_dir / "work" / "runs" / name / "ours").exists()  # outputs removed
    # fresh class images: made inside each timed run; otherwise once, before the timed runs
    assert result["class_images_in_run"] is fresh and (result["class_images_s"] == 0) is fresh
    # made beforehand with the identity training compares, so that this tool's run finds them usable
    assert log.count("0 usable, 2 to generate (of 2 wanted)") == (2 if fresh else 0)
    assert ("2 usable, 0 to generate (of 2 wanted)" in log) is not fresh
    assert (str(bench_dir / "work" / "runs" / name / "ours-class") in result["commands"]["ours"]) is fresh


def test_settings_are_checked_before_anything_runs(tmp_path):
    peer = tmp_path / "train_dreambooth.py"
    peer.write_text("")
    with pytest.raises(UserError) as e:
        check_settings(BenchSettings(method="lora", steps=3, warmup=2, peer=peer, model="nowhere"), cuda=False)
    message = str(e.value)
    assert "give train_dreambooth_lora.py" in message and "--steps (3)" in message and "nowhere" in message
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        check_settings(BenchSettings(precision="fp16"), cuda=False)
    with pytest.raises(UserError, match="--lean-memory needs a CUDA GPU"):
        check_settings(BenchSettings(lean_memory=True), cuda=False)


def test_lean_memory_gives_both_programs_8bit_adam_and_checkpointing(tmp_path):
    flags = train_flags(BenchSettings(lean_memory=True, method="lora"), tmp_path, tmp_path, tmp_path, tmp_path, 64,
                        "bf16")
    assert flags[-4:] == ["--use_8bit_adam", "--gradient_checkpointing", "--rank", "4"]
    assert "--use_8bit_adam" not in train_flags(BenchSettings(), tmp_path, tmp_path, tmp_path, tmp_path, 64, "no")
    row = _result("cuda", "full", 0.02, 0.05)
    row["lean_memory"] = True
    assert "| cuda | SD 1.x | small | full, 8-bit AdamW + checkpointing | 128 |" in format_table([row])


def _result(device, method, ours, peer=None, fresh=False):
    r = {"device": device, "model": "small", "method": method, "resolution": 128, "precision": "no", "steps": 50,
         "rank": 4 if method == "lora" else None, "s_per_step_median": ours, "peak_mem_mb": 800.0, "wall_s": 30.0,
         "mfu": None, "peer": None, "speedup": None, "memory_ratio": None, "class_images_in_run": fresh}
    if peer:
        r.update(peer={"s_per_step_median": peer, "peak_mem_mb": 1000.0, "wall_s": 40.0, "mfu": None},
                 speedup=peer / ours, memory_ratio=0.8)
    return r


def test_table_is_built_from_the_result_files(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu-small-full-128-no.json").write_text(json.dumps(_result("cpu", "full", 0.25, 0.40)))
    (results / "cpu-small-lora-128-no.json").write_text(json.dumps(_result("cpu", "lora", 0.20)))
    (results / "cpu-small-full-128-no-fresh.json").write_text(json.dumps(_result("cpu", "full", 0.25, 0.40, True)))
    (results / "cpu-convolutions.json").write_text(json.dumps({"cases": []}))  # another script's: not a row
    doc = tmp_path / "bench.md"
    doc.write_text("# Bench\n\nbefore\n<!-- bench-table:start -->\nold\n<!-- bench-table:end -->\nafter\n")
    table = write_table(doc, results)
    lines = table.splitlines()
    assert len(lines) == 5 and lines[0].startswith("| device | family | model | method |")
    full = "| cpu | SD 1.x | small | full | 128 | no | 50 | 0.250 | 0.400 | 1.60x | 800 | 1000 | 0.80 |"
    assert lines[2].startswith(full + " beforehand | 30.0 | 40.0 | 0.75 |")
    assert lines[3].startswith(full + " in the run | 30.0 | 40.0 | 0.75 |")
    assert lines[4].startswith("| cpu | SD 1.x | small | LoRA r4 | 128 | no | 50 | 0.200 | - | - | 800 | - | - | "
                               "beforehand | 30.0 | - | - |")
    text = doc.read_text()
    assert "old" not in text and text.startswith("# Bench\n\nbefore\n") and text.endswith("after\n")
    assert table in text
    assert format_table([_result("cpu", "full", 0.25)]).count("\n") == 2


def test_table_command_rewrites_the_doc_and_says_when_there_is_nothing(tmp_path, capsys):
    from dreambooth.cli import main

    results = tmp_path / "results"
    results.mkdir()
    doc = tmp_path / "bench.md"
    assert main(["bench", "--table", "--results", str(results), "--doc", str(doc)]) == 2
    assert "no results in" in capsys.readouterr().err
    (results / "cpu-small-full-128-no.json").write_text(json.dumps(_result("cpu", "full", 0.25, 0.40)))
    assert main(["bench", "--table", "--results", str(results), "--doc", str(doc)]) == 0
    assert "| cpu | SD 1.x | small | full |" in doc.read_text()


def test_the_command_passes_every_argument_to_the_script(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: dreambooth bench") and "--fresh-class-images" in shown and "--peer SCRIPT" in shown
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--num_class_images", "0"])  # the other spelling reaches the script's parser too
    assert e.value.code == 2
    assert "--num-class-images must be at least 1 (got 0)" in capsys.readouterr().err


def test_an_installation_without_the_repository_says_where_bench_lives(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "repository", lambda: tmp_path)
    assert cli.main(["bench", "--table"]) == 2
    err = capsys.readouterr().err
    assert "developer tool" in err and "bench/bench.py" in err and "Traceback" not in err


def test_the_script_runs_from_the_repository_root(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/bench.py", "--table", "--results", str(tmp_path)], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"no results in {tmp_path}" in proc.stderr


def test_profile_script_records_exactly_one_training_step(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "profile_step.py"
    out = tmp_path / "profile"
    subprocess.run([sys.executable, str(script), "--model", "tiny", "--step", "3", "--work", str(tmp_path / "work"),
                    "--out", str(out)], check=True, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["model"], summary["step"], summary["optimizer_steps_recorded"]) == ("tiny", 3, 1)
    assert summary["step_s"] > 0 and "aten::" in (out / "operators.txt").read_text()
    assert (out / "trace.json").stat().st_size > 0


def test_a_switch_of_this_tool_is_measured_under_its_own_name(tmp_path):
    """--ours-arg reaches this tool's command only; --tag names the result, and the table shows the switch."""
    from bench import commands

    s = BenchSettings(ours_arg=["--cuda_graph=off"], tag="graph-off", peer=tmp_path / "train_dreambooth.py")
    cmds = commands(s, tmp_path, (tmp_path, tmp_path, tmp_path), tmp_path, 64, "bf16", True, 2)
    assert cmds["ours"][-1] == "--cuda_graph=off" and "--cuda_graph=off" not in cmds["peer"]
    row = {**_result("cuda", "full", 0.02), "ours_args": ["--cuda_graph=off"], "tag": "graph-off"}
    assert "full (--cuda_graph=off)" in format_table([row])


def test_a_setting_of_both_programs_reaches_both_commands(tmp_path):
    """--both-arg goes to this tool and to the peer alike (a flag they share, such as --train_text_encoder)."""
    from bench import commands

    s = BenchSettings(both_arg=["--train_text_encoder"], tag="te", peer=tmp_path / "train_dreambooth_lora_sdxl.py")
    cmds = commands(s, tmp_path, (tmp_path, tmp_path, tmp_path), tmp_path, 64, "no", False, 2)
    assert "--train_text_encoder" in cmds["ours"] and cmds["peer"][-1] == "--train_text_encoder"
    row = {**_result("cpu", "lora", 0.02), "both_args": ["--train_text_encoder"], "tag": "te"}
    assert "(both: --train_text_encoder)" in format_table([row])


def _flow_folder(root: Path, pipeline: str, guidance: bool | None = None) -> Path:
    """A folder that says its family as a real one does (model_index.json; Flux's transformer config)."""
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    if guidance is not None:
        (root / "transformer").mkdir()
        (root / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": guidance}))
    return root


def test_flow_families_get_their_flags_on_both_sides_and_their_own_peer_script(tmp_path):
    """Flux and SD3: T5's length, the timestep density, Flux.1 dev's guidance and --cache_latents, the same for both
    programs; the peer must be that family's script, the resolution a multiple of 16."""
    from bench import commands

    dev = _flow_folder(tmp_path / "flux-dev", "FluxPipeline", guidance=True)
    schnell = _flow_folder(tmp_path / "flux-schnell", "FluxPipeline", guidance=False)
    sd3 = _flow_folder(tmp_path / "sd3", "StableDiffusion3Pipeline")
    want = {dev: ["--cache_latents", "--max_sequence_length", "512", "--weighting_scheme", "none",
                  "--guidance_scale", "3.5"],
            schnell: ["--cache_latents", "--max_sequence_length", "512", "--weighting_scheme", "none"],
            sd3: ["--cache_latents", "--max_sequence_length", "77", "--weighting_scheme", "logit_normal"]}
    for model, flags in want.items():
        s = BenchSettings(method="lora", peer=tmp_path / "train_dreambooth_lora_flux.py")
        cmds = commands(s, model, (tmp_path, tmp_path / "c", tmp_path / "pc"), tmp_path, 64, "no", False, 2)
        for who in ("ours", "peer"):
            line = " ".join(cmds[who])
            assert " ".join(flags + ["--rank", "4"]) in line, (model.name, who)
    assert "--cache_latents" not in train_flags(BenchSettings(), tmp_path, tmp_path, tmp_path, tmp_path, 64, "no")
    full = train_flags(BenchSettings(method="full"), sd3, tmp_path, tmp_path, tmp_path, 64, "no")
    assert full[-4:] == ["--max_sequence_length", "77", "--weighting_scheme", "logit_normal"]  # no --cache_latents

    peer = tmp_path / "train_dreambooth_lora.py"
    peer.write_text("")
    with pytest.raises(UserError) as e:
        check_settings(BenchSettings(model=str(dev), method="lora", peer=peer, resolution=72), cuda=False)
    assert "give train_dreambooth_lora_flux.py" in str(e.value) and "multiple of 16" in str(e.value)
    flux_full = tmp_path / "train_dreambooth_flux.py"
    flux_full.write_text("")
    check_settings(BenchSettings(model="flux-tiny", method="full", peer=flux_full), cuda=False)
    with pytest.raises(UserError, match="give train_dreambooth_lora_sd3.py"):
        check_settings(BenchSettings(model="sd3-tiny", method="lora", peer=flux_full), cuda=False)
    row = {**_result("cpu", "lora", 0.05, 0.10), "model": "flux-tiny", "family": "flux", "resolution": 64}
    assert "| cpu | Flux.1 | flux-tiny | LoRA r4 | 64 |" in format_table([row])


def test_the_peer_torchvision_stand_in_gets_the_crop_the_flow_scripts_call(tmp_path):
    """diffusers' SDXL, Flux and SD3 scripts call RandomCrop.get_params and transforms.functional.crop."""
    shim = tmp_path / "shim" / "torchvision" / "transforms"
    shim.mkdir(parents=True)
    (shim.parent / "__init__.py").write_text("")
    (shim / "__init__.py").write_text("import torch\n\n\nclass RandomCrop:\n    pass\n")
    (shim / "functional.py").write_text("")
    copy = bench.peer_tv_shim(tmp_path / "shim", tmp_path / "work")
    check = ("from PIL import Image\nfrom torchvision import transforms\nfrom torchvision.transforms.functional "
             "import crop\nimage = Image.new('RGB', (80, 64))\ni, j, h, w = transforms.RandomCrop.get_params(image, "
             "(64, 64))\nassert i == 0 and 0 <= j <= 16 and (h, w) == (64, 64)\nassert crop(image, i, j, h, w).size "
             "== (64, 64)\n")
    subprocess.run([sys.executable, "-c", check], env={**os.environ, "PYTHONPATH": str(copy)}, check=True)
    assert bench.peer_tv_shim(copy, tmp_path / "again") is not None  # a complete stand-in is copied as it is
    assert (tmp_path / "again" / "tv_shim" / "torchvision" / "transforms" / "functional.py").read_text().count(
        "def crop") == 1
