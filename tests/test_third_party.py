"""fastopt.AdamW dropped into third-party trainers exactly as a user would: PyTorch Lightning
(``configure_optimizers``) and Hugging Face ``transformers.Trainer`` (``optimizers=``).

Every run is repeated with ``torch.optim.AdamW(foreach=False)`` in the same trainer, with the
same model, seed and data: swapping the class must change nothing beyond rounding. Each test
also checks that the feature it names (scheduler, clipping, accumulation, resume) really acted,
so a trainer that silently skipped it would fail rather than match trivially.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import fastopt

# fastopt's fp32 CPU step matches torch's for-loop AdamW to rounding: tests/test_adamw.py holds
# it to these over 25 steps, and no run here takes more than 12.
RTOL, ATOL = 1e-5, 1e-6

LR = 1e-2
WEIGHT_DECAY = 0.1
BATCH = 8
# Far below the gradients of this problem (global norms 0.7 to 1.3, largest elements 0.2 to
# 0.6), so every step is clipped.
CLIP_NORM = 0.05
CLIP_VALUE = 0.01

OPTIMIZERS = {
    "fastopt": fastopt.AdamW,
    "torch": functools.partial(torch.optim.AdamW, foreach=False),
}


def lr_factor(step: int) -> float:
    """Linear warm-up over 3 steps, then linear decay: the lr differs at every step."""
    return min((step + 1) / 3, 1.0 - step / 20)


def make_scheduler(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def regression_data(n_batches, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * BATCH, 6, generator=gen)
    y = torch.randn(n_batches * BATCH, 3, generator=gen)
    return x, y


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, rtol=RTOL, atol=ATOL):
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_moved(model: torch.nn.Module, seed=0):
    """Guards every comparison: two runs that both left the params alone would agree."""
    for p, p0 in zip(model.parameters(), tiny_model(seed).parameters()):
        assert (p - p0).abs().max() > 100 * ATOL


def grad_norm(module: torch.nn.Module) -> float:
    norms = [torch.linalg.vector_norm(p.grad) for p in module.parameters()]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


# ----------------------------------------------------------------------------------------------
# PyTorch Lightning


def lightning_module(L, make_opt):
    class Regressor(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()
            self.batches_seen = 0
            # Per optimizer step: the gradients before and after Lightning's clipping.
            self.grads_before: list[float] = []
            self.grads_after: list[tuple[float, float]] = []  # (global norm, largest |g|)

        def training_step(self, batch, batch_idx):
            self.batches_seen += 1
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_gradient_clipping(self, optimizer, **clip_kwargs):
            self.grads_before.append(grad_norm(self))
            super().configure_gradient_clipping(optimizer, **clip_kwargs)
            largest = max(float(p.grad.abs().max()) for p in self.parameters())
            self.grads_after.append((grad_norm(self), largest))

        def configure_optimizers(self):
            opt = make_opt(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
            # interval="step": Lightning steps the scheduler after every optimizer step.
            sched = {"scheduler": make_scheduler(opt), "interval": "step"}
            return {"optimizer": opt, "lr_scheduler": sched}

    return Regressor()


def lightning_trainer(L, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def lightning_loader(n_batches):
    dataset = torch.utils.data.TensorDataset(*regression_data(n_batches))
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)


LIGHTNING_CONFIGS = {
    "plain": dict(),
    "clip-norm": dict(gradient_clip_val=CLIP_NORM),
    "clip-value": dict(gradient_clip_val=CLIP_VALUE, gradient_clip_algorithm="value"),
    "accumulate-2": dict(accumulate_grad_batches=2),
    "accumulate-2-clip-norm": dict(accumulate_grad_batches=2, gradient_clip_val=CLIP_NORM),
}


@pytest.mark.parametrize("config", list(LIGHTNING_CONFIGS))
def test_lightning_trains_like_torch_adamw(config):
    L = pytest.importorskip("lightning")
    trainer_kwargs = LIGHTNING_CONFIGS[config]
    accumulate = trainer_kwargs.get("accumulate_grad_batches", 1)
    steps = 8
    runs = {}
    for name, make_opt in OPTIMIZERS.items():
        module = lightning_module(L, make_opt)
        trainer = lightning_trainer(L, max_steps=steps, **trainer_kwargs)
        trainer.fit(module, lightning_loader(steps * accumulate))
        runs[name] = (module, trainer)

    module, trainer = runs["fastopt"]
    opt = trainer.optimizers[0]
    assert type(opt) is fastopt.AdamW
    assert module.batches_seen == steps * accumulate
    assert all(float(s["step"]) == steps for s in opt.state.values())
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * lr_factor(steps))
    # The clip threshold is below every gradient norm, so a clip that did not happen shows.
    assert len(module.grads_before) == steps
    assert min(module.grads_before) > CLIP_NORM
    clip = trainer_kwargs.get("gradient_clip_val")
    algorithm = trainer_kwargs.get("gradient_clip_algorithm", "norm")
    for norm, largest in module.grads_after:
        if clip is None:
            assert norm > CLIP_NORM
        elif algorithm == "norm":
            # clip_grad_norm_ scales by CLIP_NORM / (norm + 1e-6): off by under 1e-6 / 0.7.
            assert norm == pytest.approx(CLIP_NORM, rel=1e-5)
        else:
            assert largest == pytest.approx(CLIP_VALUE)
    assert_moved(module.net)
    assert_same_params(module.net, runs["torch"][0].net)


def fp16_plugin(init_scale):
    from lightning.pytorch.plugins import MixedPrecision

    # Trainer(precision="16-mixed") is GPU-only; the plugin gives the same loop on the CPU.
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler), scaler


# Losses near 1 give fp16 gradients near 1 times the scale: 2**20 overflows fp16 (max 65504),
# so the scaler skips steps, halving the scale until the gradients fit (4 of 8 steps here).
OVERFLOWING_SCALE = 2.0**20


# torch's AdamW is not called on a skipped step, and the scheduler warns about that.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("clip", [None, CLIP_NORM], ids=["no-clip", "clip-norm"])
def test_lightning_fp16_loss_scaling_like_torch_adamw(clip):
    """fastopt.AdamW has _step_supports_amp_scaling: GradScaler hands it the scale and the inf
    flag, and it unscales and skips inside the step, where torch's for-loop AdamW is handed
    gradients GradScaler unscaled. Lightning, like torch's fused AdamW, refuses its own
    gradient_clip_val for such an optimizer, so fastopt clips with max_grad_norm instead: the
    same unscale, clip, step recipe, in one pass."""
    L = pytest.importorskip("lightning")
    steps = 8
    runs = {}
    for name, make_opt in OPTIMIZERS.items():
        clip_kwargs = {}
        if clip is not None and name == "fastopt":
            make_opt = functools.partial(make_opt, max_grad_norm=clip)
        elif clip is not None:
            clip_kwargs = dict(gradient_clip_val=clip)
        module = lightning_module(L, make_opt)
        plugin, scaler = fp16_plugin(OVERFLOWING_SCALE)
        trainer = lightning_trainer(L, max_steps=steps, plugins=[plugin], **clip_kwargs)
        trainer.fit(module, lightning_loader(steps))
        step_counts = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
        runs[name] = (module, scaler.get_scale(), step_counts)

    module, scale, step_counts = runs["fastopt"]
    torch_module, torch_scale, torch_step_counts = runs["torch"]
    # Some steps were skipped, and the same ones: fewer counted steps, a lowered scale.
    assert 0 < min(step_counts) and max(step_counts) < steps
    assert step_counts == torch_step_counts
    assert scale == torch_scale < OVERFLOWING_SCALE
    if clip is not None:  # the reference really clipped every step it took
        clipped = [
            n for n, _ in torch_module.grads_after if n == pytest.approx(CLIP_NORM, rel=1e-5)
        ]
        assert len(clipped) == min(step_counts)
    assert_moved(module.net)
    # Power-of-two scales unscale exactly; the fp16 forward and backward are the same ops.
    assert_same_params(module.net, runs["torch"][0].net)


def test_lightning_checkpoint_resume_matches_uninterrupted(tmp_path):
    """Lightning saves and restores the optimizer and scheduler through their state_dicts:
    a run stopped after one epoch and resumed from its checkpoint ends where an uninterrupted
    one does. Epoch boundaries keep the data order identical: Lightning restarts a plain
    DataLoader from its first batch on resume."""
    L = pytest.importorskip("lightning")
    epochs, batches_per_epoch = 2, 4

    whole = lightning_module(L, fastopt.AdamW)
    lightning_trainer(L, max_epochs=epochs).fit(whole, lightning_loader(batches_per_epoch))

    first = lightning_module(L, fastopt.AdamW)
    trainer = lightning_trainer(L, max_epochs=1)
    trainer.fit(first, lightning_loader(batches_per_epoch))
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    # A fresh module, its params shifted: only the checkpoint can bring it to the halfway state.
    resumed = lightning_module(L, fastopt.AdamW)
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    trainer = lightning_trainer(L, max_epochs=epochs)
    trainer.fit(resumed, lightning_loader(batches_per_epoch), ckpt_path=ckpt)

    opt = trainer.optimizers[0]
    assert type(opt) is fastopt.AdamW
    total = epochs * batches_per_epoch
    assert all(float(s["step"]) == total for s in opt.state.values())
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * lr_factor(total))
    assert_moved(whole.net)
    # The same operations on the same data in the same process: no rounding to allow for.
    assert_same_params(resumed.net, whole.net, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers.Trainer


class DictRegressor(torch.nn.Module):
    """transformers.Trainer calls ``model(**batch)`` and reads ``outputs["loss"]``."""

    def __init__(self, seed=0):
        super().__init__()
        self.net = tiny_model(seed)
        self.batches_seen = 0

    def forward(self, x, labels):
        self.batches_seen += 1
        out = self.net(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, n_batches):
        self.x, self.y = regression_data(n_batches)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def hf_grad_norm_recorder(transformers, model):
    class GradNormRecorder(transformers.TrainerCallback):
        """Called after optimizer.step and before the gradients are zeroed: the gradients the
        optimizer was handed, after the Trainer's clipping (AdamW leaves .grad alone)."""

        def __init__(self):
            self.norms: list[float] = []

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.norms.append(grad_norm(model))

    return GradNormRecorder()


HF_CONFIGS = {
    "no-clip": dict(max_grad_norm=0.0),
    "clip-norm": dict(max_grad_norm=CLIP_NORM),
    "accumulate-2-clip-norm": dict(gradient_accumulation_steps=2, max_grad_norm=CLIP_NORM),
}


@pytest.mark.parametrize("config", list(HF_CONFIGS))
def test_hf_trainer_trains_like_torch_adamw(config, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf_kwargs = HF_CONFIGS[config]
    accumulate = hf_kwargs.get("gradient_accumulation_steps", 1)
    steps = 8
    runs = {}
    for name, make_opt in OPTIMIZERS.items():
        model = DictRegressor()
        recorder = hf_grad_norm_recorder(transformers, model)
        opt = make_opt(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name),
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            seed=0,
            **hf_kwargs,
        )
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=DictDataset(steps * accumulate),
            optimizers=(opt, make_scheduler(opt)),
            callbacks=[recorder],
        )
        trainer.train()
        runs[name] = (model, opt, recorder.norms)

    model, opt, norms = runs["fastopt"]
    assert model.batches_seen == steps * accumulate
    assert len(norms) == steps
    clip = hf_kwargs["max_grad_norm"]
    for norm in norms:
        if clip > 0:
            assert norm == pytest.approx(CLIP_NORM, rel=1e-5)  # as for Lightning's clip
        else:
            assert norm > CLIP_NORM
    assert all(float(s["step"]) == steps for s in opt.state.values())
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * lr_factor(steps))
    assert_moved(model.net)
    assert_same_params(model.net, runs["torch"][0].net)
