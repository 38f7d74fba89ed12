"""Adapters for the training loops people use (optional dependencies, imported lazily).

* :mod:`curvlab.integrations.hf`: Hugging Face ``Trainer``: ``optimizer_cls_and_kwargs(...)``
  for every curvlab optimizer that the Trainer can step, and ``CurvatureMonitorCallback``.
* :mod:`curvlab.integrations.lightning`: PyTorch Lightning ``CurvatureMonitorCallback``.
* :func:`build_optimizer`: one curvlab optimizer for a model with the right parameter
  routing (shared by both; use it in ``LightningModule.configure_optimizers``).

``import curvlab`` and ``import curvlab.integrations`` never import transformers or
lightning; only the ``hf`` / ``lightning`` submodules do.
"""

from curvlab.integrations.optimizers import OPTIMIZERS as OPTIMIZERS
from curvlab.integrations.optimizers import build_optimizer as build_optimizer
