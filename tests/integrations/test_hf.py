"""The HF Trainer with curvlab optimizers (passed the documented way) and the monitor
callback: training, parameter routing, bit-for-bit resume through the Trainer's own
checkpoints, and a monitor that never changes the training."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from curvlab.diagnostics.monitor import unwrap_optimizer  # noqa: E402
from curvlab.integrations import OPTIMIZERS, hf  # noqa: E402
from curvlab.linalg.krylov import lanczos  # noqa: E402
from curvlab.linops import HessianOperator  # noqa: E402

V = 64
KWARGS = {"soap": {"lr": 3e-3}, "shampoo": {"lr": 1e-3, "precondition_frequency": 2},
          "muon": {"lr": 0.02, "adamw_lr": 3e-3}, "kfac": {"lr": 0.05, "precondition_frequency": 2}}


def _data(n=32, T=16):
    ids = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def _model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=32, bos_token_id=0,
        eos_token_id=0))


def _lm_loss(out, y):
    """The model's own causal-LM loss, for the monitor batch ({input_ids}, labels)."""
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1))


def _monitor():
    """The documented default: the first training examples, the model's own loss."""
    return hf.CurvatureMonitorCallback(num_examples=4, every=2, track_every=1, max_hvps=4,
                                       jump_factor=0.5, jump_warmup=0)


def _trainer(out, name, monitor=True, steps=6):
    args = transformers.TrainingArguments(
        str(out), max_steps=steps, per_device_train_batch_size=4, save_strategy="steps",
        save_steps=3, logging_steps=3, report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True)
    return transformers.Trainer(
        _model(), args, train_dataset=_data(),
        optimizer_cls_and_kwargs=hf.optimizer_cls_and_kwargs(name, **KWARGS[name]),
        callbacks=[_monitor()] if monitor else [])


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_trainer_trains_monitors_and_resumes_bit_for_bit(name, tmp_path):
    a = _trainer(tmp_path / "a", name)
    a.train()
    assert isinstance(unwrap_optimizer(a.optimizer), OPTIMIZERS[name])
    logged = {h["step"]: h for h in a.state.log_history if "curvlab/sharpness" in h}
    assert {1, 2, 4, 6} <= set(logged)  # checks (an early one at 1; sooner ones when a
    # ratio is suspicious) reach the logs
    assert all(h["curvlab/sharpness"] > 0 for h in logged.values())
    assert any("curvlab/events" in h for h in a.state.log_history)  # and the events
    # resume from the Trainer's own checkpoint in a fresh Trainer: the same parameters
    ckpt = tmp_path / "a" / "checkpoint-3"
    b = _trainer(tmp_path / "b", name)
    b.train(resume_from_checkpoint=str(ckpt))
    pa, pb, p3 = _params(a), _params(b), load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["transformer.h.0.attn.c_attn.weight"],
                           p3["transformer.h.0.attn.c_attn.weight"])
    monitor = next(cb for cb in b.callback_handler.callbacks
                   if isinstance(cb, hf.CurvatureMonitorCallback)).monitor
    assert [c["step"] for c in monitor.checks] == [4, 6]  # aligned with global_step
    if name != "kfac":
        return
    # the monitor leaves training untouched (K-FAC's hooks paused, its own random stream)
    c = _trainer(tmp_path / "c", name, monitor=False)
    c.train()
    pc = _params(c)
    assert all(torch.equal(pa[k], pc[k]) for k in pa)


def test_muon_routing_in_the_trainer(tmp_path):
    t = _trainer(tmp_path, "muon", monitor=False, steps=1)
    t.train()
    opt = unwrap_optimizer(t.optimizer)
    names = {id(p): n for n, p in t.model.named_parameters()}
    adamw = {names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    muon = [g for g in opt.param_groups if g["use_muon"]]
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= adamw  # wte = tied head
    assert all("ln_" in n or n.endswith("bias") or "wte" in n or "wpe" in n for n in adamw)
    assert len(muon) == 1 and muon[0]["transposed"] and len(muon[0]["params"]) == 8


def test_optimizer_cls_and_kwargs_refuses_what_the_trainer_cannot_step():
    with pytest.raises(ValueError, match="closure"):
        hf.optimizer_cls_and_kwargs("lbfgs", lr=1.0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        hf.optimizer_cls_and_kwargs("adamw", lr=1.0)
    with pytest.raises(TypeError, match="lr"):
        hf.optimizer_cls_and_kwargs("soap")


def test_default_monitor_batch_and_the_models_own_loss(tmp_path):
    """The documented default: no batch, no loss_fn (the first training examples through the
    collator, the model's own loss)."""
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    cb = hf.CurvatureMonitorCallback(num_examples=4, every=2, max_hvps=40, tol=1e-4,
                                     plain_sharpness=True)  # lambda_max for any SOAP rule
    t = transformers.Trainer(_model(), args, train_dataset=_data(), callbacks=[cb],
                             optimizer_cls_and_kwargs=hf.optimizer_cls_and_kwargs("soap",
                                                                                  lr=3e-3))
    t.train()
    ids = torch.stack([d["input_ids"] for d in _data()[:4]])
    assert torch.equal(cb.monitor.batch["input_ids"], ids)  # the first examples, collated
    check = cb.monitor.checks[-1]  # the one at step 2 (after an early check at step 1)
    # the same sharpness as with the causal-LM loss written out
    op = HessianOperator(t.model, _lm_loss, ({"input_ids": ids}, ids))
    with sdpa_kernel([SDPBackend.MATH]):  # differentiable twice
        ref = float(lanczos(op, 1, tol=1e-6, max_iter=60,
                            generator=torch.Generator().manual_seed(0)).eigenvalues[0])
    assert check["lambda_max"] == pytest.approx(ref, rel=1e-3)


def test_callback_placed_first_reaches_the_report_to_integrations(tmp_path):
    """report_to integrations run before user callbacks; inserted first, the monitor's values
    are in the logs they receive."""
    seen = []

    class Reporter(transformers.TrainerCallback):  # stands in for TensorBoard, W&B, ...
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    t = _trainer(tmp_path, "soap", monitor=False, steps=2)
    t.add_callback(Reporter())
    t.callback_handler.callbacks.insert(0, _monitor())
    t.train()
    assert any("curvlab/sharpness" in logs for logs in seen)
