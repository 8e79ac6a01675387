"""The optimizers of training.optimizer (training.components.OPTIMIZERS): each one's first step against its paper's
formula, the vocabulary a new token leaves exactly as it was under each, and exact resume with each.

AdamW's resume is tests/test_train_e2e.py::test_resume_gives_the_same_weights_as_not_stopping; 8-bit AdamW's needs
CUDA and bitsandbytes (marked gpu). Which optimizer a run builds, and that its settings reach it, is wired in
tests/test_wiring.py.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from conftest import UNET_FILE, interrupt_after
from safetensors.torch import load_file

from dreambooth.config_file import load_config
from dreambooth.errors import TrainingStopped, UserError
from dreambooth.training.components import make_optimizer
from dreambooth.training.loop import train
from dreambooth.training.rundir import with_optimizer

TEXT_ENCODER_FILE = "text_encoder/model.safetensors"
# Learning rates for the tiny model: Lion's below AdamW's, as usual; Prodigy's multiplier at the top of the band
# pre-flight allows (config.PRODIGY_LR_BAND), where its step-size estimate d grows from the second step (at 1.0 it
# stays at d0 for the tiny run's first 5 steps), so that a resume that lost d would show.
RATES = {"adamw": 1e-3, "prodigy": 10.0, "lion": 1e-4}


def training_cfg(**training):
    return load_config(None, {"model.pretrained_model": "m", "dataset.instance_prompt": "a photo of sks dog",
                              **{f"training.{k}": v for k, v in training.items()}})


def stepped(cfg, start: torch.Tensor, grads: list[torch.Tensor], lr: float, weight_decay: float):
    """The optimizer make_optimizer builds for one parameter, and the parameter after one step per gradient."""
    param = torch.nn.Parameter(start.clone())
    optimizer = make_optimizer(cfg, [{"params": [param], "lr": lr, "weight_decay": weight_decay}],
                               torch.device("cpu"))
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return optimizer, param.detach()


def test_lions_first_step_moves_each_weight_by_the_learning_rate_against_its_gradients_sign():
    """Lion (arXiv:2302.06675, Algorithm 2) from zero momentum: p <- p * (1 - lr * wd) - lr * sign(g). Bitwise: the
    sign makes lr * sign(g) exact, so the hand computation rounds exactly as the optimizer does."""
    g = torch.Generator().manual_seed(0)
    start, grad = torch.randn(64, generator=g), torch.randn(64, generator=g)
    grad[::7] = 0.0  # no gradient, no move: what keeps a new token's frozen vocabulary rows as they are
    lr, wd = 3e-4, 0.1
    optimizer, after = stepped(training_cfg(optimizer="lion", adam_beta1=0.9, adam_beta2=0.99), start, [grad], lr, wd)
    assert type(optimizer).__name__ == "Lion" and optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert torch.equal(after, start * (1 - lr * wd) - lr * torch.sign(grad))
    assert torch.equal(after[::7], start[::7] * (1 - lr * wd))


@pytest.mark.numerics
@pytest.mark.parametrize("bias_correction", [True, False])
def test_prodigys_first_two_steps_by_hand(bias_correction):
    """Prodigy (arXiv:2306.06101, Algorithm 4 with Adam; prodigyopt 1.1) in float64, so the comparison is tight.

    Step 1: the step-size estimate d is still d0 = 1e-6, so the step is Adam's scaled by d0: with bias correction
    bc = sqrt(1 - b2) / (1 - b1), p <- p (1 - wd d0 lr bc) - d0 lr bc (1 - b1) g / (sqrt(1 - b2) |g| + eps).
    Step 2: d = max(d0, d_coef * r / sum|s|), with r = d0 lr bc2 <g2, p0 - p1> and s = beta3 d0 g1 + d0 g2
    (--prodigy_safeguard_warmup: lr left out of s).
    """
    b1, b2, b3, eps, lr, wd, d0, d_coef = 0.9, 0.999, 0.95, 1e-8, 10.0, 0.01, 1e-6, 2.0
    cfg = training_cfg(optimizer="prodigy", learning_rate=lr, prodigy_beta3=b3, prodigy_d_coef=d_coef,
                       prodigy_use_bias_correction=bias_correction, adam_weight_decay=wd)
    g = torch.Generator().manual_seed(1)
    p0, g1, noise = (torch.randn(32, generator=g, dtype=torch.float64) for _ in range(3))
    g2 = 0.5 * g1 + 0.1 * noise  # mostly along g1, so the weights moved the way g2 points: d grows

    def bc(k: int) -> float:
        return math.sqrt(1 - b2 ** k) / (1 - b1 ** k) if bias_correction else 1.0

    optimizer, p1 = stepped(cfg, p0, [g1], lr, wd)
    dlr = d0 * lr * bc(1)
    want = p0 * (1 - wd * dlr) - dlr * (d0 * (1 - b1) * g1) / (d0 * math.sqrt(1 - b2) * g1.abs() + d0 * eps)
    torch.testing.assert_close(p1, want, rtol=1e-12, atol=0)
    assert optimizer.param_groups[0]["d"] == d0

    optimizer, _ = stepped(cfg, p0, [g1, g2], lr, wd)
    r = d0 * lr * bc(2) * torch.dot(g2, p0 - p1).item()
    s = (b3 * d0 * g1 + d0 * g2).abs().sum().item()
    assert optimizer.param_groups[0]["d"] == pytest.approx(max(d0, d_coef * r / s), rel=1e-12)
    assert optimizer.param_groups[0]["d"] > d0  # the estimate grew, so the check above reads d_coef and beta3


# ---------------------------------------------------------------------------------------------------------------
# Through training: a new token's frozen vocabulary, and resume


@pytest.mark.parametrize("name,extra", [("prodigy", {}), ("prodigy", {"training__prodigy_decouple": False}),
                                        ("lion", {})], ids=["prodigy", "prodigy-coupled-decay", "lion"])
def test_a_new_tokens_training_leaves_the_rest_of_the_vocabulary_bitwise_as_it_was(probe, name, extra):
    """The frozen rows get zero gradients (tokens.train_only_rows) and their group no weight decay
    (components.param_groups); every optimizer must then leave them exactly unchanged: Lion's sign of a zero momentum
    is zero, Prodigy's moments of a zero gradient are zero (decoupled or coupled decay of zero adds nothing). The
    UNet's weight decay is on, so an optimizer that applied it to the embedding would show here."""
    p = probe(token__identifier="<zwx>", token__initializer="cat", token__class_word="dog",
              dataset__instance_prompt=None, training__optimizer=name, training__learning_rate=RATES[name],
              training__adam_weight_decay=0.05, **extra)
    assert type(p.run.optimizer.optimizer).__name__ == {"prodigy": "Prodigy", "lion": "Lion"}[name]
    new = p.run.models.tokenizer.convert_tokens_to_ids("<zwx>")
    encoder = p.run.models.text_encoder
    key = next(n for n, q in encoder.named_parameters() if q is encoder.get_input_embeddings().weight)
    before, after = p.before["text_encoder"][key], encoder.get_input_embeddings().weight.detach()
    assert [i for i in range(len(before)) if not torch.equal(after[i], before[i])] == [new]
    assert p.changed("unet")


def resumable(model, instance_dir, out, optimizer: str, **extra) -> dict:
    """A 4-step run with a new token (a second optimizer group, masked rows) and a cosine schedule (a schedule state
    to restore), on `optimizer`. No warm-up: Prodigy skips a step at learning rate 0, and its estimate would not have
    grown yet by step 2, where the run stops."""
    return {"model.pretrained_model": str(model), "dataset.instance_dir": str(instance_dir),
            "dataset.instance_prompt": "a photo of <zq> dog", "token.identifier": "<zq>", "token.initializer": "dog",
            "training.resolution": 64, "training.max_train_steps": 4, "training.seed": 3,
            "training.lr_scheduler": "cosine", "training.optimizer": optimizer,
            "training.learning_rate": RATES[optimizer], "training.cuda_graph": "off", "output.output_dir": str(out),
            "output.report_to": "none", "output.logging_steps": 1, "output.checkpointing_steps": 100, **extra}


def last_log(out) -> dict:
    return json.loads((out / "logs" / "train_log.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("optimizer", ["prodigy", "lion"])
def test_resume_gives_the_same_weights_as_not_stopping(tiny_model, instance_dir, tmp_path, monkeypatch, optimizer):
    """Stopped during step 2 and resumed to step 4: bitwise the weights of the run that never stopped. Prodigy keeps
    its step-size estimate (d, its running sums, the step count) in its parameter groups, Lion its momentum in its
    state; both travel in accelerate's optimizer state."""
    straight = tmp_path / "straight"
    train(load_config(None, resumable(tiny_model, instance_dir, straight, optimizer)))
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        interrupt_after(m, calls=2)
        with pytest.raises(TrainingStopped, match="stopped at step 2"):
            train(load_config(None, resumable(tiny_model, instance_dir, stopped, optimizer)))
    train(load_config(None, resumable(tiny_model, instance_dir, stopped, optimizer,
                                      **{"output.resume_from_checkpoint": "latest"})))
    for file in (UNET_FILE, TEXT_ENCODER_FILE):
        a, b = load_file(str(straight / file)), load_file(str(stopped / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{file} differs after resume"
    assert last_log(stopped).get("prodigy_d") == last_log(straight).get("prodigy_d")
    # another optimizer would meet state of the wrong kind: refused before any weights load
    with pytest.raises(UserError, match=f"optimizer: '{optimizer}' there, 'adamw' now"):
        train(load_config(None, resumable(tiny_model, instance_dir, stopped, "adamw",
                                          **{"output.resume_from_checkpoint": "latest"})))


def test_a_checkpoint_from_before_the_optimizer_was_recorded_resumes_into_adamw_only():
    """Such a checkpoint was trained by AdamW, 8-bit or not (--use_8bit_adam was not recorded either)."""
    old = {"method": "full"}
    assert with_optimizer(old, {"optimizer": "adamw8bit"}) == {"method": "full", "optimizer": "adamw8bit"}
    assert with_optimizer(old, {"optimizer": "prodigy"}) == {"method": "full", "optimizer": "adamw"}
    assert with_optimizer({"optimizer": "lion"}, {"optimizer": "adamw"}) == {"optimizer": "lion"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_8bit_adamw_continues_bitwise_from_its_saved_state_on_cuda():
    """bitsandbytes keeps 8-bit moments with their quantization maps and scales in its state; saved and loaded as
    accelerate does (torch.save, loaded onto the CPU, then into a fresh optimizer), the steps after it are bitwise
    those of the optimizer that never stopped. Fixed gradients, so only the optimizer's own state can differ."""
    pytest.importorskip("bitsandbytes")
    cfg = training_cfg(optimizer="adamw8bit")
    g = torch.Generator(device="cuda").manual_seed(0)
    start = torch.randn(8192, device="cuda", generator=g)  # over 4096 elements: 8-bit moments, not fp32 ones
    grads = [torch.randn(8192, device="cuda", generator=g) for _ in range(6)]
    straight, after = stepped(cfg, start, grads, 1e-3, 0.01)
    first, half = stepped(cfg, start, grads[:3], 1e-3, 0.01)
    assert any(s["state1"].dtype == torch.uint8 for s in first.state.values())
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    param = torch.nn.Parameter(half.clone())
    resumed = make_optimizer(cfg, [{"params": [param], "lr": 1e-3, "weight_decay": 0.01}], torch.device("cuda"))
    resumed.load_state_dict(torch.load(buffer, map_location="cpu"))
    for grad in grads[3:]:
        param.grad = grad.clone()
        resumed.step()
    assert torch.equal(param.detach(), after)
