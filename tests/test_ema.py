"""The EMA of the trained weights (--use_ema, training.ema): its update by hand, what a LoRA run saves, that drawing
and saving leave training as it was, and exact resume (SD full fine-tuning, a Flux LoRA)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import UNET_FILE, interrupt_after
from safetensors import safe_open
from safetensors.torch import load_file
from test_wiring import ema_by_hand, watch_ema

from dreambooth.config_file import load_config
from dreambooth.errors import TrainingStopped
from dreambooth.formats.lora import LORA_FILE, TOKEN_FILE
from dreambooth.training.ema import RAW_WEIGHTS, Slot, WeightAverage, describe, make_schedule
from dreambooth.training.loop import train


def schedule(**training):
    cfg = load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "a photo of sks dog",
                             "training.use_ema": True, **{f"training.{k}": v for k, v in training.items()}})
    return make_schedule(cfg)


# ------------------------------------------------------------------------------------------- the update, by hand
@pytest.mark.numerics
@pytest.mark.parametrize("on_cpu", [False, True])
def test_the_ema_update_by_hand(on_cpu):
    """A weight that is 0, then 1, 2 and 4 after three steps. Update t + 1 uses decay (1 + t) / (10 + t): 0, 2/11,
    3/12, so the EMA is 1, then 2/11 * 1 + 9/11 * 2 = 20/11, then 1/4 * 20/11 + 3/4 * 4 = 38/11. Capped at 0.2, the
    third decay is 0.2: 0.2 * 20/11 + 0.8 * 4 = 39.2/11. A new token's row is averaged alone; the other rows of its
    embedding are not touched."""
    cases = {(): [1, 20 / 11, 38 / 11], (("ema_decay", 0.2),): [1, 20 / 11, 39.2 / 11],
             (("ema_update_after_step", 1),): [1, 2, 2 / 11 * 2 + 9 / 11 * 4],
             (("ema_warmup", True),): [1, (d := 1 - 2 ** (-2 / 3)) + (1 - d) * 2,
                                       (e := 1 - 3 ** (-2 / 3)) * (d + (1 - d) * 2) + (1 - e) * 4]}
    for settings, want in cases.items():
        weight = torch.nn.Parameter(torch.zeros(2))
        table = torch.nn.Parameter(torch.zeros(3, 2))  # row 2 is the new token's
        slots = [Slot("w", weight), Slot("table", table, torch.tensor([2]))]
        average = WeightAverage(slots, schedule(**dict(settings)), on_cpu=on_cpu)
        got = []
        for value in (1.0, 2.0, 4.0):
            with torch.no_grad():
                weight.fill_(value)
                table.fill_(value)
            average.update()
            got.append(average.averaged()["w"][0].item())
            assert average.averaged()["table"].shape == (1, 2)
            assert average.averaged()["table"][0, 0].item() == got[-1]
        assert got == pytest.approx(want, rel=1e-6), settings
        with average.swapped_in():
            assert weight[0].item() == got[-1] and table[2, 0].item() == got[-1] and table[0, 0].item() == 4.0
        assert weight.tolist() == [4.0, 4.0] and table.tolist() == [[4.0, 4.0]] * 3


def test_the_update_is_diffusers_emamodel_step():
    """The same weights through diffusers' EMAModel.step (its foreach form) give the same bits."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ours = WeightAverage([Slot(str(i), w) for i, w in enumerate(weights)], schedule(ema_decay=0.5))
    theirs = EMAModel(weights, decay=0.5, foreach=True)
    for _ in range(12):  # past the step where the decay reaches its cap of 0.5
        with torch.no_grad():
            for w in weights:
                w.add_(torch.randn_like(w))
        ours.update()
        theirs.step(weights)
    assert ours.schedule.cur_decay_value == 0.5
    assert all(torch.equal(a, b) for a, b in zip(ours.shadow, theirs.shadow_params))


def test_a_swap_puts_the_trained_weights_back_when_the_block_fails():
    weight = torch.nn.Parameter(torch.full((2,), 3.0))
    average = WeightAverage([Slot("w", weight)], schedule())
    with torch.no_grad():
        weight.fill_(5.0)
    with pytest.raises(RuntimeError), average.swapped_in():
        assert weight.tolist() == [3.0, 3.0]
        raise RuntimeError("a validation that fails")
    assert weight.tolist() == [5.0, 5.0]


def test_the_start_line_says_how_long_the_average_is():
    """What a run prints when it starts: with diffusers' ramp the 800th update's decay is 800/809, about 90 steps."""
    cfg = load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "a photo of sks dog",
                             "training.use_ema": True})
    line = describe(cfg, 800)
    assert "its decay grows as (1 + t) / (10 + t) after t updates, up to 0.999" in line
    assert "at step 800 the decay is 0.9889, an average over about the last 90 steps" in line
    cfg.training.ema_decay = 0.95
    assert "at step 800 the decay is 0.95, an average over about the last 20 steps" in describe(cfg, 800)


# ------------------------------------------------------------------------------------------- runs
def lora_probe(probe, **extra):
    return probe(model__method="lora", model__train_text_encoder=True, token__identifier="<zq>",
                 token__initializer="dog", token__class_word="dog", dataset__instance_prompt=None,
                 training__use_ema=True, training__learning_rate=1e-2, training__max_train_steps=3,
                 output__checkpointing_steps=3, **extra)


def test_a_lora_run_saves_the_ema_of_its_adapters_and_token_row(probe, monkeypatch, tmp_path):
    """The LoRA file and the token file are what saving the EMA computed by hand from each step's adapters and new
    row gives; the checkpoint's layout holds the same EMA, its raw file the last step's weights; the run says so."""
    from dreambooth.training.outputs import save_lora_output

    updates = watch_ema(monkeypatch)
    p = lora_probe(probe)
    average = p.run.ema
    names = [slot.name for slot in average.slots]
    assert any(".lora_A." in n for n in names if n.startswith("unet."))
    assert any(".lora_A." in n for n in names if n.startswith("text_encoder."))
    embedding = next(s for s in average.slots if s.rows is not None)  # the new token's row alone
    assert embedding.rows.tolist() == p.run.models.new_token_ids["text_encoder"]
    assert average.averaged()[embedding.name].shape[0] == 1
    start = {}
    for slot in average.slots:
        component, name = slot.name.split(".", 1)
        before = p.before[component][name]
        start[slot.name] = before if slot.rows is None else before[slot.rows]
    for slot, value in zip(average.slots, ema_by_hand(start, updates).values()):
        slot.write(value)
    save_lora_output(p.run, tmp_path / "by-hand")
    for file in (LORA_FILE, TOKEN_FILE):
        saved, by_hand = load_file(str(p.out / file)), load_file(str(tmp_path / "by-hand" / file))
        assert saved.keys() == by_hand.keys() and all(torch.equal(saved[k], by_hand[k]) for k in saved), file
        checkpoint = load_file(str(p.out / "checkpoint-3" / file))
        assert all(torch.equal(saved[k], checkpoint[k]) for k in saved), file
    raw = load_file(str(p.out / "checkpoint-3" / RAW_WEIGHTS))
    assert raw.keys() == set(names) and all(torch.equal(raw[k], updates[-1]["weights"][k]) for k in raw)
    assert any(not torch.equal(raw[k], average.averaged()[k]) for k in raw)
    info = json.loads((p.out / "run_info.json").read_text())
    assert info["weights"].startswith("EMA weights (decay at most 0.999, 0.25 at step 3")
    with safe_open(str(p.out / LORA_FILE), "pt") as f:
        assert f.metadata()["dreambooth.weights"] == info["weights"]
    assert f"Weights: {info['weights']}." in (p.out / "README.md").read_text()
    assert "EMA weights (decay at most 0.999" in (p.out / "report.html").read_text()
    state = json.loads((p.out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["ema"] == {"decay": 0.999, "update_after_step": 0, "warmup": False, "updates": 3}


def test_drawing_and_saving_with_the_ema_leave_training_as_it_was(probe):
    """Validation at every step and a checkpoint at every step swap the EMA in and out: the trained weights and the
    EMA end bit for bit as in a run that does neither."""
    plain = probe(training__use_ema=True, training__max_train_steps=3)
    busy = probe(training__use_ema=True, training__max_train_steps=3, output__checkpointing_steps=1,
                 validation__prompts=["a photo of sks dog"], validation__steps=1, validation__num_images=1,
                 validation__num_inference_steps=1)
    assert len(list((busy.out / "samples").iterdir())) == 3 and len(list(busy.out.glob("checkpoint-*"))) == 3
    live = [dict(p.run.models.unet.named_parameters()) for p in (plain, busy)]
    assert all(torch.equal(live[0][k], live[1][k]) for k in live[0])
    a, b = (load_file(str(p.out / UNET_FILE)) for p in (plain, busy))
    assert all(torch.equal(a[k], b[k]) for k in a)


def run_values(model, photos, out, **extra):
    values = {"model.pretrained_model": str(model), "dataset.instance_dir": str(photos),
              "dataset.instance_prompt": "a photo of <zq> dog", "token.identifier": "<zq>",
              "token.initializer": "dog", "training.resolution": 64, "training.learning_rate": 1e-3,
              "training.seed": 7, "training.use_ema": True, "output.output_dir": str(out),
              "output.report_to": "none", "output.checkpointing_steps": 100}
    return load_config(None, {**values, **extra})


def test_resume_with_the_ema_gives_the_same_weights_as_not_stopping(tiny_model, instance_dir, tmp_path, monkeypatch):
    """Full fine-tuning with a new token, accumulation and random flips, stopped during step 3 and resumed: the EMA
    it saves is bitwise the uninterrupted run's, and it is not the last step's weights."""
    extra = {"training.gradient_accumulation_steps": 2, "dataset.random_flip": True, "training.max_train_steps": 5,
             "training.ema_decay": 0.5}
    train(run_values(tiny_model, instance_dir, tmp_path / "straight", **extra))
    interrupt_after(monkeypatch, calls=5)
    with pytest.raises(TrainingStopped, match="stopped at step 3"):
        train(run_values(tiny_model, instance_dir, tmp_path / "stopped", **extra))
    monkeypatch.undo()
    checkpoint = tmp_path / "stopped" / "checkpoint-3"
    with safe_open(str(checkpoint / RAW_WEIGHTS), "pt") as f:
        assert json.loads(f.metadata()["dreambooth.ema"])["updates"] == 3
    train(run_values(tiny_model, instance_dir, tmp_path / "stopped", **extra,
                     **{"output.resume_from_checkpoint": "latest"}))
    for file in (UNET_FILE, "text_encoder/model.safetensors"):
        a, b = (load_file(str(tmp_path / run / file)) for run in ("straight", "stopped"))
        assert all(torch.equal(a[k], b[k]) for k in a), file
    raw = load_file(str(checkpoint / RAW_WEIGHTS))
    layout = load_file(str(checkpoint / UNET_FILE))
    assert any(not torch.equal(raw[f"unet.{k}"], layout[k]) for k in layout)


def test_a_checkpoint_resumes_from_its_raw_weights_with_or_without_the_ema(tiny_model, instance_dir, tmp_path,
                                                                           capsys):
    """The EMA never feeds back into training: a run with it, resumed without it, trains what a run that never had
    one trains. A checkpoint saved without an EMA starts one from its weights when resumed with --use_ema."""
    steps = {"output.checkpointing_steps": 2}
    train(run_values(tiny_model, instance_dir, tmp_path / "plain", **steps, **{"training.max_train_steps": 4,
                                                                                 "training.use_ema": False}))
    train(run_values(tiny_model, instance_dir, tmp_path / "dropped", **steps, **{"training.max_train_steps": 2}))
    train(run_values(tiny_model, instance_dir, tmp_path / "dropped", **steps, **{
        "training.max_train_steps": 4, "training.use_ema": False, "output.resume_from_checkpoint": "latest"}))
    plain, dropped = (load_file(str(tmp_path / run / UNET_FILE)) for run in ("plain", "dropped"))
    assert all(torch.equal(plain[k], dropped[k]) for k in plain)

    train(run_values(tiny_model, instance_dir, tmp_path / "added", **steps, **{"training.max_train_steps": 2,
                                                                                 "training.use_ema": False}))
    capsys.readouterr()
    train(run_values(tiny_model, instance_dir, tmp_path / "added", **steps, **{
        "training.max_train_steps": 4, "output.resume_from_checkpoint": "latest"}))
    assert "checkpoint-2 was saved without an EMA; the EMA starts from its weights" in capsys.readouterr().out
    raw = load_file(str(tmp_path / "added" / "checkpoint-4" / RAW_WEIGHTS))
    assert all(torch.equal(plain[k], raw[f"unet.{k}"]) for k in plain)
    with safe_open(str(tmp_path / "added" / "checkpoint-4" / RAW_WEIGHTS), "pt") as f:
        assert json.loads(f.metadata()["dreambooth.ema"])["updates"] == 2


def test_a_flux_lora_with_the_ema_resumes_bitwise(tmp_path):
    """The flow-matching family: a Flux LoRA with --use_ema, 2 steps + resume against 4 straight."""
    from conftest import photo_folder

    from dreambooth.models.tiny_families import build_model

    model = build_model(tmp_path / "flux", size="flux-tiny", seed=3)
    photos = photo_folder(tmp_path / "photos", 3)
    extra = {"model.method": "lora", "dataset.instance_prompt": "a photo of sks dog", "token.identifier": "sks",
             "token.initializer": None, "training.ema_decay": 0.5, "output.checkpointing_steps": 2}
    train(run_values(model, photos, tmp_path / "whole", **extra, **{"training.max_train_steps": 4}))
    train(run_values(model, photos, tmp_path / "part", **extra, **{"training.max_train_steps": 2}))
    train(run_values(model, photos, tmp_path / "part", **extra, **{"training.max_train_steps": 4,
                                                                     "output.resume_from_checkpoint": "latest"}))
    a, b = (load_file(str(tmp_path / run / LORA_FILE)) for run in ("whole", "part"))
    assert a.keys() == b.keys() and any(k.startswith("transformer.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    raw = load_file(str(tmp_path / "whole" / "checkpoint-4" / RAW_WEIGHTS))
    assert raw and all(k.startswith("transformer.") for k in raw)
