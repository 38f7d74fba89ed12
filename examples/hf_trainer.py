"""A curvlab optimizer and the curvature monitor inside the Hugging Face Trainer.

A tiny GPT-2 (random weights, built from its config) on random tokens, trained by the
Trainer with Muon, SOAP, Shampoo or K-FAC passed the documented way
(``optimizer_cls_and_kwargs=curvlab.integrations.hf.optimizer_cls_and_kwargs(...)``: the
right parameter routing, state saved in the Trainer's checkpoints), while
``CurvatureMonitorCallback`` adds lambda_max, lr x lambda_max and warnings to the Trainer's
logs. Needs ``pip install -c constraints.txt transformers accelerate``.

Run: python examples/hf_trainer.py [--optimizer muon|soap|shampoo|kfac] [--steps 40]
"""

import argparse
import logging
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from curvlab.integrations import hf

ap = argparse.ArgumentParser()
ap.add_argument("--optimizer", default="muon", choices=["muon", "soap", "shampoo", "kfac"])
ap.add_argument("--steps", type=int, default=40)
args = ap.parse_args()
logging.basicConfig(level=logging.WARNING)  # monitor warnings are logged

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                   n_positions=32, bos_token_id=0, eos_token_id=0))
tokens = torch.randint(0, 64, (256, 32))
train_set = [{"input_ids": t, "labels": t} for t in tokens]  # the model computes its loss

# lr must be given here: the Trainer does not pass TrainingArguments.learning_rate on
settings = {"muon": dict(lr=0.02, adamw_lr=3e-3), "soap": dict(lr=3e-3),
            "shampoo": dict(lr=1e-3), "kfac": dict(lr=0.05)}[args.optimizer]
monitor = hf.CurvatureMonitorCallback(every=10, track_every=5)  # first 16 examples, own loss

with tempfile.TemporaryDirectory() as out:
    trainer = Trainer(
        model,
        TrainingArguments(out, max_steps=args.steps, per_device_train_batch_size=16,
                          logging_steps=10, save_steps=20, report_to="none", use_cpu=True),
        train_dataset=train_set,
        optimizer_cls_and_kwargs=hf.optimizer_cls_and_kwargs(args.optimizer, **settings),
        callbacks=[monitor],
    )
    trainer.train()
    # resuming is the Trainer's own: trainer.train(resume_from_checkpoint=True)

for row in trainer.state.log_history:
    if "curvlab/lambda_max" in row:
        print(f"step {row['step']:3d}  loss {row.get('loss', float('nan')):.3f}  "
              f"lambda_max {row['curvlab/lambda_max']:8.3f}  "
              f"lr x lambda_max {row['curvlab/lr_sharpness']:.3f}")
print(monitor.monitor.summary())
