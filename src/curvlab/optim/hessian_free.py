"""Hessian-free optimization (truncated Newton with Gauss-Newton curvature).

Martens (2010), "Deep learning via Hessian-free optimization", Algorithm 1, with the
Armijo line search of Martens & Sutskever (2012, sec. 8.8). Each step on a batch:

1. gradient ``g`` and the damped Gauss-Newton system ``B d = -g``, ``B = G + lambda I``,
   ``G = J^T H_loss J`` applied matrix-free (:class:`curvlab.linops.GGNOperator`)
   on a random fraction of the batch (Martens 2010, sec. 4.3: curvature mini-batches
   smaller than the gradient's);
2. CG started from ``zeta * d_prev`` (warm start, sec. 4.5), preconditioned by ``M``:

   - ``"kfac"`` (the default where every parameter is in a layer with Kronecker factors:
     Linear, Conv2d, HF Conv1D, Embedding): the K-FAC approximation of ``B``,
     ``M = blockdiag((A + pi sqrt(lambda) I) (x) (G + sqrt(lambda) / pi I))`` per layer
     (Martens & Grosse 2015, sec. 6.3: factored Tikhonov damping), ``A``, ``G`` moving
     averages over steps of one Monte-Carlo K-FAC draw per step on the curvature batch
     (targets sampled from the model: one forward and one backward pass);
   - ``"ggn"`` (the default otherwise): the diagonal ``M = (D + lambda)^0.75`` (the form of
     Martens 2010, sec. 4.7) with ``D`` the Gauss-Newton diagonal, a moving average of one
     unbiased Monte-Carlo draw per step (``(J^T u)^2``, ``u`` the scores of sampled
     targets: one backward pass);
   - ``"martens"``: Martens' own ``D = diag(sum_n grad l_n^2) / N`` (empirical Fisher from
     per-sample gradients);

   stopped by the relative-progress rule on ``phi(d) = d^T B d / 2 + g^T d``:
   ``i > k, phi_i < 0, (phi_i - phi_{i-k}) / phi_i < k eps``, ``k = max(10, i / 10)``,
   or at the step's budget: 1.5x the iterate the previous step chose in 3. (rounded up;
   2x if that was CG's last iterate, where the budget may have cut CG short), at least 5
   (and ``cg_min_iter``), at most ``cg_max_iter`` (40 with K-FAC, 50 otherwise; the
   first step's budget; ``adaptive_cg_budget=False``: every step's). Later iterates fit
   the curvature batch's quadratic model better but the loss of the gradient batch
   worse, so the backtracking of 3. discards them: on the deep autoencoders below, after
   the first ~20 steps it chose iterate 5-9 of 20 in most steps (tanh, ReLU), and the
   products past it were wasted. The budget follows the chosen iterate, leaving room
   for one or two saved iterates past it (a curvlab rule, not Martens');
3. backtracking over the CG iterates saved at ``i = ceil(1.3^j)``: walk back from the last
   while the loss keeps decreasing (sec. 4.6);
4. Levenberg-Marquardt damping from ``rho = (f(theta + d) - f(theta)) / phi(d)``:
   ``lambda *= 2`` if ``rho < 1/4``, ``lambda /= 2`` if ``rho > 3/4`` (the rule of sec. 4.1
   with Marquardt-style factors 2 and 1/2 instead of Martens' 3/2 and 2/3, below); when
   the chosen iterate raised the loss (``rho < 0``), ``lambda *= 2 2^(k-1)`` (2, 4, 8,
   ...) on the ``k``-th such step in a row (Nielsen's doubling ``nu``: Madsen, Nielsen &
   Tingleff 2004);
5. Armijo backtracking ``alpha <- 0.8 alpha`` until ``f(theta + alpha d) <= f(theta) +
   c alpha g^T d``; ``theta += lr alpha d``. No acceptable alpha: the step is rejected
   (parameters unchanged) and ``lambda`` is raised.

The defaults are chosen for a fixed time budget rather than a fixed number of steps
(``benchmarks/bench_hessian_free_autoencoders.py``, deep digits autoencoders with sigmoid,
tanh and ReLU units, CPU): the CG products dominate the cost of a step, so the curvature
batch is a quarter of the gradient batch and CG's budget follows the chosen iterate
(step 2). With a fixed budget of 20 K-FAC-preconditioned iterations, most steps after
the first ~20 chose iterate 5-9 (tanh, ReLU); the adaptive budget makes ~9-18 products
per step there, so more steps fit in the time. Paired 25 s runs (seeds 0 / 1 / 2, fixed
20 -> adaptive with cap 40, set by a harness around the optimizer; first step 20): tanh
0.0023 / 0.0031 / 0.0025 -> 0.0018 / 0.0018 / 0.0027, ReLU 0.0042 / 0.0111 / 0.0043 ->
0.0048 / 0.0079 / 0.0054 (no gain there). Growth 1.5 rather than 2 past a chosen
iterate that was not the last (seeds 0-2, median; 10 s on the deep autoencoders, 8 s on
problems outside the benchmark, two runs of the old rule): sigmoid 0.0179 / 0.0170 ->
0.0173, tanh 0.0023 / 0.0027 -> 0.0016, ReLU 0.0059 / 0.0056 -> 0.0047 (25 s: 0.0059 ->
0.0054, 0.00081 -> 0.00043, 0.0030 -> 0.0031); training loss of a digits CNN with
BatchNorm 0.62 -> 0.33, a digits tanh MLP 6e-6 / 9e-6 -> 4e-7, a diabetes tanh MLP
(MSE) 3.7e-6 / 1.8e-6 -> 4e-7, a deep ReLU MLP 0.018 -> 0.020, the shallow sigmoid
autoencoder (BCE) 0.2517 / 0.2513 -> 0.254. Growth 1.5 also after a last iterate
costs the plateau phases (sigmoid 0.0187, shallow autoencoder 0.259). The cap of 40 rather than 20
matters on sigmoid, whose plateau phase keeps choosing the last iterate (adaptive, 25 s,
seeds 0-3: cap 20: 0.025 / 0.019 / 0.037 / 0.019, cap 40: 0.018 / 0.021 / 0.019 /
0.016). Fixed budgets tried before (K-FAC, 10 / 20 / 30 iterations: ReLU 0.0063
/ 0.0043 / 0.0047, sigmoid 0.033 / 0.020 / 0.018; the Gauss-Newton diagonal with 10 / 20
/ 50 / 100: ReLU 0.016 / 0.017 / 0.0066 / 0.0087, sigmoid 0.043 / 0.043 / 0.035 /
0.043). Initial ``lambda = 1e-3`` (the old 1.0 spent ~17 steps of a 20-50-step budget
only lowering it by 2/3 per step on mean-reduced losses). The damping factors 2 and 1/2
(Martens: 3/2 and 2/3): with sigmoid units HF sits on a plateau where ``rho ~ 1`` while
``lambda`` falls from 1e-3 to its floor, ~16 steps at 2/3 per step (2-3 s of a 10 s
budget); a lower start instead (1e-5) cost tanh and ReLU their first steps (10 s: tanh
0.0025 -> 0.077). HF alone, seeds 0-2, median error, 3/2 & 2/3 -> 2 & 1/2: 10 s
sigmoid 0.0239 -> 0.0154, tanh 0.0025 -> 0.0023, ReLU 0.0058 -> 0.0054; 25 s 0.0152 ->
0.0057, 0.00076 -> 0.00066, 0.0030 -> 0.0030 (3 & 1/3 at 10 s: 0.0149, 0.0023, 0.0057);
on problems outside the benchmark (8 s, training loss): a digits CNN 0.0057 -> 0.0020,
the shallow sigmoid autoencoder 0.0117 -> 0.0102, a digits tanh MLP ~1e-5 both. The
doubling boosts over consecutive loss increases (``rho < 0``), HF alone, 25 s, seeds 0-2,
median: sigmoid 0.0052 -> 0.0030, tanh 0.00040 -> 0.00046 (seed spread 0.0003-0.0008),
ReLU 0.0027 -> 0.0022; a deeper narrow net (64-200-100-50-10-...) 0.0167 -> 0.0053,
0.00099 -> 0.00079, 0.0057 -> 0.0045; a wide one (64-512-256-32-...) 0.0037 -> 0.0021,
0.00098 -> 0.00083, 0.0014 -> 0.0015; outside the benchmark (8 s, training loss, paired)
the digits CNN 0.33 -> 0.27, the deep ReLU MLP 0.016 -> 0.0069, the shallow sigmoid
autoencoder 0.254 -> 0.250, the tanh MLPs ~3e-7 both; a tiny GPT-2 character LM (20 s,
validation loss, seeds 0 / 1, batches of 32 and 128 sequences) 2.43 / 2.73 -> 2.30 / 2.13
and 2.09 / 2.00 -> 1.88 / 1.98. Feed batches of
``recommended_batch_size`` (1024) or more: the gradient and the line search use the
whole batch.

The preconditioner: under PyTorch's default initialization the signal shrinks through
every layer, and the Gauss-Newton diagonal at initialization spans 3 (tanh), 4 (ReLU) and
13 (sigmoid: 2e-16 in the first layer, 1e-3 in the last) decades over the layers, which
slows unpreconditioned CG. A preconditioner changes CG's speed, never its solution. The
Monte-Carlo Gauss-Newton diagonal costs one backward pass (Martens' empirical-Fisher
diagonal needs per-sample gradients, about 35 CG iterations' worth on a 256-sample
curvature batch) and its moving average (one draw's relative error per coordinate is
~sqrt(2)) is accurate enough; at 25 s against none: ReLU 0.0113 -> 0.0066, sigmoid
0.043 -> 0.035, tanh 0.0026 -> 0.0028. K-FAC also captures the correlations within a
layer: CG's early iterates are then good enough that 20 iterations suffice, and a step
made 20 products instead of 45-50 (fixed budgets; profile, deep ReLU autoencoder, 117,712
parameters, one CPU thread: products 48%, K-FAC solves 19% (the factor matmuls: 79 MFLOP each
against a product's 240), the K-FAC draw with its Cholesky inverses 10%, line search
10%, gradient 5%; this VM's absolute step times drifted 1.6x within an hour). At 25 s against the
diagonal (3 seeds, median): ReLU 0.0066 -> 0.0043, sigmoid 0.035 -> 0.020, tanh 0.0028
-> 0.0028. Drawing the factors and inverting them only every 5 steps (sooner when
``lambda`` moved 4x) was tried and left out: the stale preconditioner costs more CG
iterations than the draws it saves (25 s, seeds 0-2, median, every step -> every 5: wide
net sigmoid 0.0022 -> 0.0038, tanh 0.00068 -> 0.00092, ReLU 0.0015 -> 0.0022, fewer
steps each; benchmark net sigmoid 0.0028 -> 0.0034, ReLU 0.0022 -> 0.0028).

A Gauss-Newton product costs 1.3-1.4 gradients on the same samples (``J v`` by double
backward 3.5 ms, ``J^T u`` 3.2 ms, the gradient 4.7 ms): close to the matrix-product count
of an MLP (4 passes against 3), so little is left to gain there
(``torch.func.linearize``'s ``J v``: 3.9 ms, ``torch.func.jvp``: 8.0 ms). With sigmoid
units HF spends its first ~35 steps on the mean-image plateau (``rho ~ 1``, ``lambda`` at
``min_damping``): the input-dependent part of the outputs is ~1e-7 of their size there,
at float32's rounding level. Against tuned AdamW at equal time: see
``benchmarks/results/bench_hessian_free_autoencoders.txt`` (ahead on the benchmark's three
autoencoders at 10 s and 25 s and on a deeper narrow one the defaults were not chosen on;
behind on the sigmoid and tanh units of a wide shallower net, 64-512-256-32-..., where
~100 steps fit in 25 s and the K-FAC preconditioner costs about as much as the products;
its held-out error is lower on every one of them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from curvlab.linops._kronecker import uncovered_by_kfac
from curvlab.linops._outputspace import has_canonical_hessian
from curvlab.linops.diagonal import DiagonalOperator
from curvlab.linops.ggn import GGNOperator
from curvlab.linops.kfac import KFACOperator
from curvlab.objective import Objective, sample_rows
from curvlab.optim._batch_capture import InputRecorder
from curvlab.optim.base import CurvlabOptimizer, dense_grad
from curvlab.optim.stability import StabilityModel

__all__ = ["HessianFree"]

logger = logging.getLogger(__name__)

_GLOBAL = "hessian_free"
PRECONDITIONERS = ("auto", "kfac", "ggn", "martens", None)
#: default largest CG budget (``cg_max_iter=None``) with the K-FAC preconditioner and otherwise
CG_MAX_ITER_KFAC, CG_MAX_ITER = 40, 50
#: a step's CG budget: ``CG_BUDGET_GROWTH`` x the previous step's chosen iterate (``CG_BUDGET_
#: GROWTH_LAST`` x if that was CG's last iterate: the budget may have cut CG short), at least
#: ``CG_BUDGET_FLOOR``
CG_BUDGET_GROWTH, CG_BUDGET_GROWTH_LAST, CG_BUDGET_FLOOR = 1.5, 2, 5
#: Levenberg-Marquardt factors of ``lambda`` (rho < 1/4: boost, rho > 3/4: drop); Martens'
#: 3/2 and 2/3 took ~16 steps to bring lambda from 1e-3 to the floor on the sigmoid plateau
DAMPING_BOOST, DAMPING_DROP = 2.0, 0.5


def _batch_size(X: Any) -> int:
    """The number of samples of the inputs ``X``: a tensor, or a dict / tuple of tensors
    (a Hugging Face batch: ``input_ids``, ``attention_mask``, ...) sharing their first
    dimension."""
    sizes = {int(t.shape[0]) for t in tree_leaves(X) if isinstance(t, torch.Tensor)
             and t.dim() > 0}
    if len(sizes) != 1:
        raise TypeError("HessianFree needs the batch inputs as a tensor or a dict / tuple of "
                        "tensors with one first (sample) dimension; got "
                        + (f"first dimensions {sorted(sizes)}" if sizes else
                           f"{type(X).__name__}"))
    return sizes.pop()


class HessianFree(CurvlabOptimizer):
    """Hessian-free optimizer: ``opt.step(closure)`` or ``opt.step(batch=(inputs, targets))``.

    ``batch`` (``(inputs, targets)``; the inputs a tensor or a dict / tuple of tensors
    sharing their first, sample dimension, as a Hugging Face batch's ``input_ids`` and
    ``attention_mask``) gives the data of the gradient and of the loss evaluations of the line
    search, and a random subset of it (``curvature_batch_size``) those of the Gauss-Newton
    products (Martens' smaller curvature mini-batch); ``closure`` (torch convention) evaluates the
    loss and fills ``.grad`` (without it the gradient is computed on ``batch``). With a
    closure and no batch, the products use the inputs of the closure's forward pass (the
    targets are not needed: supported for CrossEntropyLoss, MSELoss, BCEWithLogitsLoss
    without weights), every line-search evaluation calls the closure (so ``.grad`` holds
    the gradient of the last evaluated point afterwards), and ``preconditioner="martens"``,
    which needs per-sample gradients with the true targets, is off (the K-FAC and
    Gauss-Newton-diagonal preconditioners sample their targets and stay on).

    Args:
        model: the ``nn.Module``; loss_fn: ``loss_fn(model(inputs), targets) -> scalar``,
            or None for the model's own loss (a Hugging Face model stepped with
            ``batch=`` dict batches carrying ``"labels"``; :mod:`curvlab.objective` finds the
            standard loss it computes, so the Gauss-Newton products have a loss).
        lr: multiplies the accepted step (1 is the Newton-like default).
        damping: initial Levenberg-Marquardt ``lambda`` (default 1e-3).
        params: parameters or param groups (default: all trainable); groups may scale the
            step with their own ``lr``.
        cg_max_iter, cg_tol: the largest CG budget (default None: 40 with the K-FAC
            preconditioner, 50 otherwise; a step's budget is 1.5x the previous step's
            chosen iterate, 2x if that was CG's last, within ``[max(5, cg_min_iter),
            cg_max_iter]``) and the
            relative-progress ``eps`` (Martens: 5e-4).
        cg_min_iter: iterations before the progress rule may stop CG (and the smallest
            budget).
        adaptive_cg_budget: False gives every step the budget ``cg_max_iter`` (the rule
            before the adaptive budget).
        warm_start: ``zeta`` of the warm start (0 disables it).
        preconditioner: ``"auto"`` (default: for ``nn.CrossEntropyLoss`` on class indices,
            ``nn.MSELoss`` and ``nn.BCEWithLogitsLoss`` without weights, ``"kfac"`` if every
            optimized parameter is in a Linear, Conv2d, HF Conv1D or Embedding layer and
            none is shared, else ``"ggn"``; none for other losses), ``"kfac"`` (the
            averaged K-FAC approximation, above; ValueError if a parameter is not
            covered), ``"ggn"`` (the averaged Monte-Carlo Gauss-Newton diagonal; needs one
            of those losses), ``"martens"`` (empirical Fisher diagonal; needs the true
            targets, off with a closure and no batch) or None. ``stats()["preconditioner"]``
            tells the one used.
        preconditioner_decay: ``beta`` of the moving average of the ``"kfac"`` factors
            and of the ``"ggn"`` diagonal (bias-corrected; default 0.95, ~20 steps).
        curvature_batch_size: the random subset of ``batch`` (drawn each step) for the
            Gauss-Newton products and the preconditioner: an int is a number of samples,
            a float in (0, 1] a fraction of the batch (rounded up; default 0.25), None
            all of it. With a summing loss (``reduction="sum"``) the subset's curvature is
            multiplied by ``n / (its samples)``, an estimate of the whole batch's.
        seed: seed of the curvature-subset draws and, for a model in train mode, of each
            step's Dropout masks (new masks every step; saved in ``state_dict``).
        min_damping, max_damping: clip of ``lambda``.
        damping_factors: ``(boost, drop)``, what ``lambda`` is multiplied by when ``rho <
            1/4`` / ``rho > 3/4`` (default ``(2, 1/2)``; Martens 2010: ``(3/2, 2/3)``);
            the ``k``-th step in a row with ``rho < 0`` multiplies it by ``boost 2^(k-1)``.
        nonfinite: ``"skip"`` or ``"raise"`` on a non-finite loss/gradient.

    ``opt.stats``: ``cg_iterations``, ``cg_budget``, ``chosen_iterate`` (of the backtracking),
    ``preconditioner``, ``damping``, ``rho``, ``alpha``, ``loss``, ``new_loss``,
    ``rejected_steps``, ``skipped_steps``.
    """

    not_compilable_because = (
        "its step is a loop of closure evaluations and autograd products (conjugate gradients, "
        "backtracking) whose length depends on the values it reads; the products dominate its "
        "time and are autograd calls either way")

    supports_add_param_group = False
    recommended_batch_size = 1024  # gradient batch the defaults were chosen for

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor] | None,
                 lr: float = 1.0, damping: float = 1e-3, *,
                 params: Iterable[Any] | None = None,
                 cg_max_iter: int | None = None, cg_min_iter: int = 1, cg_tol: float = 5e-4,
                 adaptive_cg_budget: bool = True,
                 warm_start: float = 0.95, preconditioner: str | None = "auto",
                 preconditioner_decay: float = 0.95,
                 curvature_batch_size: int | float | None = 0.25, armijo_c: float = 1e-2,
                 min_damping: float = 1e-6, max_damping: float = 1e6,
                 damping_factors: tuple[float, float] = (DAMPING_BOOST, DAMPING_DROP),
                 nonfinite: str = "skip", seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable (e.g. nn.MSELoss()) or None (the model's "
                            "own loss)")
        if loss_fn is None and preconditioner == "martens":
            raise ValueError("HessianFree: preconditioner='martens' needs an explicit loss_fn "
                             "(its per-sample gradients apply it); with the model's own loss "
                             "use 'auto' or 'ggn'")
        for name, val in (("lr", lr), ("damping", damping), ("cg_tol", cg_tol)):
            if not (isinstance(val, (int, float)) and val > 0 and math.isfinite(val)):
                raise ValueError(f"{name} must be a positive number, got {val!r}")
        for name, val in (("cg_max_iter", cg_max_iter), ("cg_min_iter", cg_min_iter)):
            if name == "cg_max_iter" and val is None:
                continue
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if not isinstance(adaptive_cg_budget, bool):
            raise TypeError(f"adaptive_cg_budget must be True or False, got "
                            f"{adaptive_cg_budget!r}")
        if not 0 <= warm_start < 1:
            raise ValueError(f"warm_start must be in [0, 1), got {warm_start}")
        if not 0 < armijo_c < 1:
            raise ValueError(f"HessianFree: armijo_c={armijo_c!r} must be in (0, 1)")
        if not (math.isfinite(min_damping) and math.isfinite(max_damping)
                and 0 < min_damping <= max_damping):
            raise ValueError(f"HessianFree: need 0 < min_damping <= max_damping (finite), got "
                             f"min_damping={min_damping!r}, max_damping={max_damping!r}")
        if not min_damping <= damping <= max_damping:
            raise ValueError(f"HessianFree: damping={damping!r} must lie in [min_damping, "
                             "max_damping]")
        boost, drop = damping_factors if (isinstance(damping_factors, (tuple, list))
                                          and len(damping_factors) == 2) else (0.0, 0.0)
        if not (math.isfinite(boost) and boost > 1 and 0 < drop < 1):
            raise ValueError(f"HessianFree: damping_factors must be (boost > 1, drop in (0, 1)), "
                             f"got {damping_factors!r}")
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got "
                             f"{preconditioner!r}")
        if not 0 <= preconditioner_decay < 1:
            raise ValueError(f"preconditioner_decay must be in [0, 1), got "
                             f"{preconditioner_decay!r}")
        cb = curvature_batch_size
        if not (cb is None or (isinstance(cb, int) and not isinstance(cb, bool) and cb >= 1)
                or (isinstance(cb, float) and 0 < cb <= 1)):
            raise ValueError("curvature_batch_size must be a positive integer, a fraction in "
                             f"(0, 1] or None, got {cb!r}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr), nonfinite=nonfinite)
        self.model, self.loss_fn = model, loss_fn
        self.cg_max_iter, self.cg_min_iter, self.cg_tol = cg_max_iter, cg_min_iter, cg_tol
        self.adaptive_cg_budget = adaptive_cg_budget
        self.warm_start = warm_start
        self.preconditioner, self.preconditioner_decay = preconditioner, preconditioner_decay
        self.curvature_batch_size = curvature_batch_size
        self.armijo_c = armijo_c
        self.min_damping, self.max_damping = min_damping, max_damping
        self.damping_factors = (float(boost), float(drop))
        self.nonfinite = nonfinite
        self._global = {"step": 0, "damping": float(damping), "diagonal_draws": 0,
                        "chosen_iterate": 0, "chosen_last": False, "failures": 0,
                        "seed": int(seed)}
        self._last: dict[str, Any] = {"rejected_steps": 0}
        self._generator = torch.Generator().manual_seed(seed)
        self._recorder = InputRecorder(model, self)
        self._decided: dict[str, Any] = {}  # facts about the model, found at the first step

    @property
    def damping(self) -> float:
        """The current Levenberg-Marquardt ``lambda`` (adapted by the reduction ratio)."""
        return self._global["damping"]

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _objective(self, batch: Any) -> Objective:
        return Objective(self.model, self.loss_fn, batch, params=self._params(),
                         train=self.model.training, seed=self._step_seed())

    # ---- linear algebra pieces -----------------------------------------------------
    def _gn_product(self, obj: Objective, data: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """``v -> J^T H_loss J v`` on one batch (:class:`curvlab.linops.GGNOperator`: the
        forward pass and the ``J^T u`` graph are recorded once and shared by the products);
        ``obj``: the step's objective (its loss convention, mode and parameters)."""
        return GGNOperator(obj.on(data)).matvec

    def _diag_ef(self, obj: Objective, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The empirical Fisher diagonal ``sum_n c_n (grad l_n)^2`` (``l_n`` sample n's own
        loss, ``c_n`` its weight, ``1 / N`` for a plain mean) on ``(X, y)``:
        :class:`curvlab.linops.DiagonalOperator` (``curvature="ef"``, exact; vectorized,
        checked, one sample at a time where vmap cannot batch the model). Samples one at a
        time have neither batch statistics nor the batch's dropout masks, so a model in
        train mode gives this preconditioner (only) in eval mode."""
        if obj.train:
            obj = Objective(self.model, self.loss_fn, (X, y), params=self._params())
        return DiagonalOperator(obj.on((X, y)), curvature="ef", method="exact").diagonal

    def _preconditioner_kind(self, obj: Objective, y: Any, closure_only: bool) -> str | None:
        """The preconditioner of this step: ``"auto"`` is ``"kfac"`` (every parameter in a
        layer with Kronecker factors) or ``"ggn"`` where the loss's output Hessian is the
        Fisher of sampled targets (CE on class indices, MSE, BCE-with-logits without
        weights) and none otherwise; ``"martens"`` needs the true targets."""
        kind = self.preconditioner
        if kind == "auto":
            if not has_canonical_hessian(obj, y):
                return None
            return "kfac" if self._kfac_coverage(obj) is None else "ggn"
        if kind == "kfac":
            missing = self._kfac_coverage(obj)
            if missing is not None:
                raise ValueError(f"HessianFree: preconditioner='kfac' needs every optimized "
                                 f"parameter in a layer with Kronecker factors (nn.Linear, "
                                 f"nn.Conv2d, HF Conv1D, nn.Embedding; no tied weights): "
                                 f"{missing}; use 'ggn' or 'auto'")
        if kind == "martens" and closure_only:
            return None
        return kind

    def _kfac_coverage(self, obj: Objective) -> str | None:
        """:func:`curvlab.linops._kronecker.uncovered_by_kfac` of the optimized parameters
        (fixed at construction: decided once)."""
        if "kfac_missing" not in self._decided:
            self._decided["kfac_missing"] = uncovered_by_kfac(self.model, obj.params)
        return self._decided["kfac_missing"]

    def _ggn_diagonal(self, obj: Objective, data: Any) -> torch.Tensor:
        """``diag(G)`` averaged over steps: an exponential moving average (decay ``beta =
        preconditioner_decay``, bias-corrected) of one Monte-Carlo draw per step on the
        curvature batch, ``(J^T u)^2`` with ``u`` the scores of targets sampled from the
        model (:class:`curvlab.linops.DiagonalOperator`, ``method="mc"``: one backward
        pass, unbiased, relative sd ~sqrt(2) per coordinate; the average's effective
        number of draws, ``(1 + beta) / (1 - beta)`` = 39 at 0.95, brings that to ~0.23)."""
        draw = DiagonalOperator(obj.on(data), method="mc", num_samples=1,
                                seed=self._draw_seed()).diagonal
        beta, count = self.preconditioner_decay, self._count_draw()
        avg = []
        for p, piece in zip(obj.params.values(), obj.unflatten(draw).values(), strict=True):
            state = self.state[p]
            if "ggn_diagonal" not in state:
                state["ggn_diagonal"] = torch.zeros_like(p)
            avg.append(state["ggn_diagonal"].mul_(beta).add_(piece, alpha=1 - beta))
        return obj.flatten(dict(zip(obj.params, avg, strict=True))) / (1 - beta ** count)

    def _draw_seed(self) -> int:
        """The seed of this step's sampled targets, from the optimizer's generator."""
        return int(torch.randint(0, 2**62, (1,), generator=self._generator))

    def _count_draw(self) -> int:
        """The number of statistics draws the preconditioner's moving average holds (saved as
        ``diagonal_draws``, the name of the first preconditioner's count)."""
        self._global["diagonal_draws"] += 1
        return self._global["diagonal_draws"]

    def _kfac_preconditioner(self, obj: Objective, data: Any, lam: float
                             ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``v -> M^-1 v`` with ``M = blockdiag((A + pi sqrt(lambda) I) (x) (G + sqrt(lambda)
        / pi I))``: the K-FAC approximation of ``B = G_gn + lambda I`` with factored Tikhonov
        damping (Martens & Grosse 2015, sec. 6.3). ``A``, ``G``: moving averages (decay
        ``preconditioner_decay``, bias-corrected) of one Monte-Carlo draw per step on the
        curvature batch (:class:`curvlab.linops.KFACOperator`, ``fisher_type="mc"``: one
        forward and one backward pass); applied as ``KFACOperator.inverse(lambda,
        method="factored")`` (Cholesky inverses of the factors). A draw with a non-finite
        entry is left out of the averages: this step runs CG without a preconditioner
        (None)."""
        op = KFACOperator(obj.on(data), fisher_type="mc", seed=self._draw_seed())
        if not all(bool(torch.isfinite(f).all()) for pair in op.factors.values() for f in pair):
            logger.warning("HessianFree: non-finite K-FAC factors on this curvature batch; "
                           "CG runs without a preconditioner this step")
            return None
        beta, count = self.preconditioner_decay, self._count_draw()
        averaged = {}
        for layer in op.layers:
            A, G = op.factors[layer.name]
            # on the layer's first parameter, one slice per group of a grouped convolution
            state = self.state[obj.params[layer.keys[0]]]
            if "kfac_A" not in state:
                state["kfac_A"] = A.new_zeros((layer.groups, *A.shape))
                state["kfac_G"] = G.new_zeros((layer.groups, *G.shape))
            A = state["kfac_A"][layer.group].mul_(beta).add_(A, alpha=1 - beta)
            G = state["kfac_G"][layer.group].mul_(beta).add_(G, alpha=1 - beta)
            averaged[layer.name] = (A / (1 - beta ** count), G / (1 - beta ** count))
        op.factors = averaged
        return op.inverse(lam, method="factored").matvec

    def _cg(self, B: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor,
            x0: torch.Tensor | None,
            Minv: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None,
            max_iter: int):
        """Preconditioned CG on ``B x = -g`` from ``x0`` (None: zero) with Martens' stopping
        rule, at most ``max_iter`` iterations (``Minv``: the inverse preconditioner, a
        diagonal or a function); returns the saved iterates ``[(i, x_i, phi(x_i))]``
        (``i = ceil(1.3^j)`` and the last) and the iteration count. ``phi`` comes from the
        residual recurrence, so the caller's ``rho`` needs no extra product; a zero start
        needs none for ``r_0``.

        The vectors are updated in place and the scalars kept as Python floats: on the
        deep digits autoencoder (117k parameters, CPU) the allocating form spent 0.8 ms per
        iteration outside the products (11% of an iteration), this one 0.25 ms."""
        if x0 is None:
            x, r = torch.zeros_like(g), g.clone()  # residual of B x + g = 0
        else:
            x = x0.clone()
            r = B(x).add_(g)

        def precondition(r: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
            if Minv is None:
                return r
            if callable(Minv):
                return Minv(r)
            return r * Minv if out is None else torch.mul(r, Minv, out=out)

        y = precondition(r, None)
        p = -y
        ry = float(r.dot(y))
        # phi(x) = x^T B x / 2 + g^T x = (g + r)^T x / 2 since B x = r - g
        phis = [0.5 * float(g.dot(x) + r.dot(x))]
        saved, next_save, j = [], 1, 0
        i = 0
        while i < max_iter:
            Bp = B(p)
            pBp = float(p.dot(Bp))
            if not math.isfinite(pBp) or pBp <= 0:
                break
            alpha = ry / pBp
            x.add_(p, alpha=alpha)
            r.add_(Bp, alpha=alpha)
            y = precondition(r, y)
            ry_new = float(r.dot(y))
            p.mul_(ry_new / ry).sub_(y)
            ry = ry_new
            i += 1
            phi = 0.5 * float(g.dot(x) + r.dot(x))
            phis.append(phi)
            if i >= next_save:
                saved.append((i, x.clone(), phi))
                j += 1
                next_save = math.ceil(1.3 ** j)
                while next_save <= i:
                    j += 1
                    next_save = math.ceil(1.3 ** j)
            k = max(10, int(0.1 * i))
            if (i > k and i >= self.cg_min_iter and phi < 0
                    and (phi - phis[i - k]) / phi < k * self.cg_tol):
                break
            if ry <= 0:
                break
        if not saved or saved[-1][0] != i:
            saved.append((i, x.clone(), phis[i]))
        return saved, i

    # ---- the step --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *,
             batch: Any = None) -> torch.Tensor:
        closure_only = batch is None
        if closure_only:
            if closure is None:
                raise ValueError("HessianFree.step needs a closure or batch=(inputs, targets)")
            if self.loss_fn is None:
                raise ValueError("HessianFree with the model's own loss (loss_fn=None) needs "
                                 "batch= (a dict batch with 'labels'): a closure does not "
                                 "show which targets its loss used")
            with torch.enable_grad():
                loss = closure()
            batch = self._recorder.batch(self.loss_fn, "HessianFree")
            closure_loss = loss
        obj = self._objective(batch)
        pairs = [(x_, y_) for _, x_, y_ in obj.batches()]
        if len(pairs) != 1:
            raise ValueError(f"batch must be one (inputs, targets) pair, got {len(pairs)} "
                             "batches; concatenate them")
        (X, y), = pairs
        params = obj.params
        if closure is not None:
            if not closure_only:
                with torch.enable_grad():
                    loss = closure()
            else:
                loss = closure_loss
            grads = {k: dense_grad(p) for k, p in params.items()}
            g = obj.flatten(grads)
            f0 = float(torch.as_tensor(loss).detach())
        else:
            loss_t, grads = obj.loss_and_grad(keep_buffers=True)  # the step's one pass
            g, f0, loss = obj.flatten(grads), float(loss_t), loss_t
        if not (math.isfinite(f0) and bool(torch.isfinite(g).all())):
            self._skip("nonfinite", "loss or gradient")
            return loss
        lam = self.damping
        cb = self.curvature_batch_size
        n = _batch_size(X)
        if isinstance(cb, float):
            cb = math.ceil(cb * n)
        # the curvature subset; with the model's own loss the rows of the batch as given
        # (labels included: the operators' objectives apply the step's convention to them)
        raw = obj.data[0] if self.loss_fn is None else None
        if cb is None or cb >= n:
            Xc, yc = X, y
        else:
            idx = torch.randperm(n, generator=self._generator)[:cb].to(g.device)
            Xc, yc, raw = (sample_rows(X, idx), sample_rows(y, idx),
                           None if raw is None else sample_rows(raw, idx))
        curvature_data = (Xc, yc) if raw is None else raw
        # a summing loss adds its samples' curvatures: the subset's, times n / (its
        # samples), estimates the batch's (a mean loss's subset estimates it as it is)
        scale = n / _batch_size(Xc) if obj.reduction == "sum" else 1.0
        with torch.enable_grad():
            gn = self._gn_product(obj, curvature_data)
            Minv = None
            kind = self._preconditioner_kind(obj, yc, closure_only)
            if kind == "martens":
                Minv = (scale * self._diag_ef(obj, Xc, yc) + lam).pow(-0.75)
            elif kind == "ggn":
                Minv = (scale * self._ggn_diagonal(obj, curvature_data) + lam).pow(-0.75)
            elif kind == "kfac":
                # (scale K + lam)^-1 = (K + lam / scale)^-1 / scale
                inverse = self._kfac_preconditioner(obj, curvature_data, lam / scale)
                Minv = None if inverse is None else (
                    lambda v, inverse=inverse: inverse(v).div_(scale))
                kind = kind if Minv is not None else None

        def B(v: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                return gn(v).mul_(scale).add_(v, alpha=lam)

        prev = [self.state[p].get("cg_direction") for p in params.values()]
        if self.warm_start and all(d is not None for d in prev):
            x0 = self.warm_start * torch.cat([d.reshape(-1) for d in prev])
            # the warm start carries the last direction's subnormal entries (coordinates
            # with next to no curvature or gradient, e.g. dead ReLU units) from step to
            # step; they slow every product that reads them on a CPU (deep ReLU
            # autoencoder: 6,000 of 117,712 after 45 steps, 0.25 -> 0.8 s per step).
            # Below the smallest normal float they are 0
            x0.masked_fill_(x0.abs() < torch.finfo(x0.dtype).tiny, 0.0)
        else:
            x0 = None
        cap = self.cg_max_iter or (CG_MAX_ITER_KFAC if kind == "kfac" else CG_MAX_ITER)
        chosen_before = self._global["chosen_iterate"]
        growth = CG_BUDGET_GROWTH_LAST if self._global["chosen_last"] else CG_BUDGET_GROWTH
        max_iter = (cap if not (chosen_before and self.adaptive_cg_budget) else
                    min(cap, max(CG_BUDGET_FLOOR, self.cg_min_iter,
                                 math.ceil(growth * chosen_before))))
        saved, iters = self._cg(B, g, x0, Minv, max_iter)
        point = {k: v.clone() for k, v in obj.param_tensors().items()}
        theta = obj.flatten(point)
        sizes = self._group_scale(obj)

        def f_at(d: torch.Tensor) -> float:
            if not closure_only:
                return float(obj.loss(obj.unflatten(theta + d)))
            for p, v in zip(params.values(), obj.unflatten(theta + d).values(), strict=True):
                p.copy_(v)
            try:
                with torch.enable_grad():
                    return float(torch.as_tensor(closure()).detach())
            finally:
                for p, v in zip(params.values(), point.values(), strict=True):
                    p.copy_(v)

        # backtrack over the CG iterates (Martens 2010, sec. 4.6)
        best_i = len(saved) - 1
        best_f = f_at(saved[best_i][1])
        for j in range(len(saved) - 2, -1, -1):
            fj = f_at(saved[j][1])
            if fj < best_f or not math.isfinite(best_f):
                best_i, best_f = j, fj
            else:
                break
        d, phi = saved[best_i][1], saved[best_i][2]
        rho = (best_f - f0) / phi if phi < 0 and math.isfinite(best_f) else -math.inf
        lam = self._next_damping(lam, rho)
        # Armijo line search on the chosen iterate (Martens & Sutskever 2012)
        slope = float(g.dot(d))
        alpha, f_new = 1.0, best_f
        while not (math.isfinite(f_new) and f_new <= f0 + self.armijo_c * alpha * slope):
            alpha *= 0.8
            if alpha < 1e-4 or slope >= 0:
                alpha = 0.0
                break
            f_new = f_at(alpha * d)
        last = saved[-1][1]
        self._global["damping"] = lam
        self._global["chosen_iterate"] = saved[best_i][0]
        self._global["chosen_last"] = best_i == len(saved) - 1
        self._global["step"] += 1
        self._counters["steps"] += 1
        self._last.update(cg_iterations=iters, cg_budget=max_iter, preconditioner=kind,
                          damping=lam, rho=rho, alpha=alpha, loss=f0,
                          new_loss=f_new if alpha > 0 else f0, chosen_iterate=saved[best_i][0])
        if alpha == 0.0:
            self._last["rejected_steps"] += 1
            for p in params.values():
                self.state[p].pop("cg_direction", None)
            logger.info("HessianFree: no acceptable step (rho=%.3g); damping -> %.3g", rho, lam)
            return loss
        step = obj.unflatten(alpha * d * sizes)
        for (k, p), dl in zip(params.items(), obj.unflatten(last).values(), strict=True):
            p.add_(step[k])
            self.state[p]["cg_direction"] = dl.clone()
        return loss

    def _next_damping(self, lam: float, rho: float) -> float:
        """Levenberg-Marquardt update of ``lambda`` from the reduction ratio ``rho``:
        ``x drop`` if ``rho > 3/4``, ``x boost`` if ``rho < 1/4``, and when the chosen
        iterate raised the batch loss (``rho < 0``, or no finite loss) ``x boost 2^(k-1)``
        on the ``k``-th such step in a row (Nielsen 1999; Madsen, Nielsen & Tingleff 2004,
        eq. 3.16: ``mu *= nu, nu *= 2``): a quadratic model that was wrong on the sign of
        the change is far outside its region of trust, and one doubling per step spent
        7 steps of 40 CG iterations there (wide sigmoid autoencoder, ``lambda`` from 4e-6
        to 5e-4 after an over-long step; 3 steps with this rule)."""
        boost, drop = self.damping_factors
        if rho < 0:
            self._global["failures"] += 1
            # (the exponent capped: 2.0 ** 1024 overflows, and lambda is clipped long before)
            doublings = min(self._global["failures"] - 1, 64)
            return min(self.max_damping, lam * boost * 2.0 ** doublings)
        self._global["failures"] = 0
        if rho < 0.25:
            return min(self.max_damping, lam * boost)
        if rho > 0.75:
            return max(self.min_damping, lam * drop)
        return lam

    def stability_model(self) -> StabilityModel:
        """With one learning rate ``<= 1`` (the default 1) every step is ``lr alpha d`` where
        ``alpha d`` passed the Armijo test on the batch (Martens & Sutskever 2012) and the
        step is never longer along ``d``: no ``lr x sharpness`` bound applies (threshold
        infinite; a monitor watches the loss and non-finite values). Learning rates above 1
        or differing between groups leave the accepted step: no rule is stated."""
        lrs = {float(g["lr"]) for g in self.param_groups}
        if len(lrs) != 1 or max(lrs) > 1.0:
            raise NotImplementedError("HessianFree states a stability rule only for one "
                                      "learning rate <= 1")
        return StabilityModel("line_search", lrs.pop(), math.inf,
                              note="Armijo backtracking on the CG direction: steps never "
                              "increase the loss of their batch")

    def _group_scale(self, obj: Objective) -> torch.Tensor:
        """Per-coordinate ``lr`` of each parameter's group, as a flat vector."""
        lr_of = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        return torch.cat([torch.full((p.numel(),), lr_of[id(p)], dtype=p.dtype,
                                     device=p.device) for p in obj.params.values()])

    def _extra_stats(self) -> dict[str, Any]:
        """Values of the last step (see the class docstring)."""
        return dict(self._last)

    def _state_template(self, p: torch.Tensor, group: dict[str, Any]
                        ) -> dict[str, tuple[int, ...]]:
        return {**dict.fromkeys(("cg_direction", "ggn_diagonal"), tuple(p.shape)),
                "kfac_A": None, "kfac_G": None}  # (groups, ...) on a layer's first parameter
