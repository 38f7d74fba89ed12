"""The Lightning Callback runs the curvature monitor and writes to the Trainer's loggers;
curvlab optimizers from build_optimizer train under Lightning's step(closure)."""

import csv

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from curvlab.integrations import build_optimizer  # noqa: E402
from curvlab.integrations.lightning import CurvatureMonitorCallback  # noqa: E402

V = 64
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),  # lightning's
              pytest.mark.filterwarnings("ignore:The number of training batches")]


def _ids(n=32, T=16):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(0))


class _LitLM(L.LightningModule):
    def __init__(self, name, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=32, bos_token_id=0,
            eos_token_id=0))
        self.name, self.kw = name, kw

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return build_optimizer(self.model, self.name, **self.kw)


def _lm_loss(out, y):
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1))


def _fit(tmp_path, name, monitor, **kw):
    lit = _LitLM(name, **kw)
    ids = _ids()
    callbacks = []
    if monitor:
        probe = ids[:4]
        callbacks = [CurvatureMonitorCallback(({"input_ids": probe}, probe), loss_fn=_lm_loss,
                                              model=lit.model, every=2, track_every=1,
                                              max_hvps=4, jump_factor=0.5, jump_warmup=0)]
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, callbacks=callbacks,
                        logger=L.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=50)
    trainer.fit(lit, torch.utils.data.DataLoader(ids, batch_size=4))
    return lit, trainer, callbacks


@pytest.mark.parametrize("name,kw", [("kfac", {"lr": 0.05, "precondition_frequency": 2}),
                                     ("muon", {"lr": 0.02, "adamw_lr": 3e-3})])
def test_lightning_callback_logs_checks_and_leaves_training_unchanged(tmp_path, name, kw):
    lit, trainer, (cb,) = _fit(tmp_path / "a", name, True, **kw)
    assert {1, 2, 4} <= {c["step"] for c in cb.monitor.checks}  # an early check at 1
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    checked = [int(r["step"]) for r in rows if r.get("curvlab/sharpness")]
    # written at their steps although log_every_n_steps=50
    assert checked == sorted(c["step"] for c in cb.monitor.checks)
    assert any(r.get("curvlab/grad_norm_jump") for r in rows)  # an event
    plain, _, _ = _fit(tmp_path / "b", name, False, **kw)
    for p, q in zip(lit.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)


class _LitMLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return build_optimizer(self, "soap", lr=1e-2)


def test_default_monitor_batch_is_the_first_training_examples():
    X, y = torch.randn(64, 4), torch.randn(64, 1)
    cb = CurvatureMonitorCallback(loss_fn=torch.nn.MSELoss(), num_examples=8, every=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8,
                                         shuffle=True)
    trainer.fit(_LitMLP(), loader)
    assert torch.equal(cb.monitor.batch[0], X[:8]) and torch.equal(cb.monitor.batch[1], y[:8])
    assert [c["step"] for c in cb.monitor.checks] == [1, 2]  # an early check at step 1
