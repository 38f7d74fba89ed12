"""Fisher information matrices (exact, Monte Carlo, empirical) as matrix-free operators.

All three are ``sum_b J_b^T M_b J_b`` with a different output-space matrix ``M_b``
(Martens 2020, "New insights and perspectives on the natural gradient method", sec. 5, 9;
Kunstner, Balles & Hennig 2019, "Limitations of the empirical Fisher approximation").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from curvlab.linops._kronecker import sample_scores
from curvlab.linops._outputspace import (
    OutputMatrix,
    OutputSpaceOperator,
    canonical_fisher,
    loss_on_outputs,
    loss_term_scale,
    per_sample_output_grads,
    sample_weights,
)

__all__ = ["EmpiricalFisherOperator", "FisherOperator", "FISHER_MODES"]

FISHER_MODES = ("exact", "mc")


def _rank_one_sum(S: torch.Tensor, scale: float | torch.Tensor) -> OutputMatrix:
    """``U -> sum_m scale_i s_mi (s_mi . u_i)`` per sample ``i`` for ``S`` of shape
    ``(m, B, ...)``: the output-space matrix ``sum_m scale_i s_mi s_mi^T`` (block diagonal
    over samples; ``scale`` a number or one weight per sample)."""
    m, batch = S.shape[0], S.shape[1]
    flat_s = S.reshape(m, batch, -1)
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(1, batch, 1)

    def apply(U: torch.Tensor) -> torch.Tensor:
        coef = torch.einsum("kbd,mbd->kmb", U.reshape(U.shape[0], batch, -1), flat_s)
        return (scale * torch.einsum("kmb,mbd->kbd", coef, flat_s)).reshape(U.shape)

    return apply


class EmpiricalFisherOperator(OutputSpaceOperator):
    """Empirical Fisher ``EF = (1/N) sum_i g_i g_i^T`` (``sum_i g_i g_i^T`` for a summing
    loss), ``g_i = grad_theta l_i`` the gradient of sample ``i``'s loss with its true label,
    ``l_i = loss_fn(f(x_i)[None], y_i[None])``.

    No per-sample parameter gradient is formed: with ``r_i = d l_i / d f_i`` in output
    space, ``g_i = J_i^T r_i`` and ``EF v = J^T [c r_i (r_i . (J v)_i)]_i`` with ``c = 1/N``
    (or 1), i.e. one JVP and one VJP per product. ``EF`` is the uncentered covariance of the
    per-sample gradients, not a curvature in general (Kunstner et al. 2019).
    """

    def _output_matrix(self, index: int, weight: float, outputs: torch.Tensor,
                       targets: Any) -> OutputMatrix:
        obj = self.objective
        loss_on_outputs(obj, outputs, targets)  # the batch loss must be a scalar
        r = per_sample_output_grads(obj, outputs, targets)
        return _rank_one_sum(r.unsqueeze(0), sample_weights(obj, weight, outputs, targets))


class FisherOperator(OutputSpaceOperator):
    """Fisher information of the model's predictive distribution, scaled like the loss.

    Supported losses (the negative log-likelihoods of canonical-link models):

    * ``nn.CrossEntropyLoss`` (no class weights), logits ``(B, C, *d)``: categorical
      likelihood ``p = softmax(f)`` at each of the ``P = prod(d)`` positions;
    * ``nn.MSELoss``: Gaussian likelihood. ``sum_j (f_j - y_j)^2`` is the negative
      log-likelihood (up to a constant) of ``y ~ N(f, sigma^2 I)`` with ``sigma^2 = 1/2``;
    * ``nn.BCEWithLogitsLoss`` (no ``weight`` / ``pos_weight``): an independent Bernoulli
      likelihood ``y_j ~ Bernoulli(sigmoid f_j)`` per output element.

    Write the full-data loss as ``L = sum_b c_b sum_{i in b} nll_i`` with ``nll_i`` the
    summed negative log-likelihood of sample ``i`` and ``c_b`` the weight of one term:
    ``c_b = w_b / (number of loss terms in b)`` for ``reduction="mean"`` (terms are the
    ``B P`` positions for cross-entropy, the ``B D`` output elements for MSE and BCE) and
    ``c_b = w_b`` for ``"sum"``.

    ``mode="exact"``: ``F = sum_b c_b sum_i J_i^T Lambda_i J_i`` with the output-space
    Fisher ``Lambda_i = E_{y~p(y|f_i)}[s s^T]``, ``s = d nll / d f``: ``diag(p) - p p^T``
    per position for cross-entropy, ``(1/sigma^2) I = 2 I`` for MSE, ``diag(sigma(f) (1 -
    sigma(f)))`` for BCE. For these
    canonical-link losses ``Lambda_i`` is the loss Hessian, so the exact Fisher equals the
    GGN (Martens 2020, sec. 9.2).

    ``mode="mc"``: draw ``num_samples`` labels per sample from the model, ``y_im ~
    p(y|f_i)`` (Categorical(softmax) per position; ``N(f_i, I/2)`` for MSE, i.e. ``s_im =
    2 (f_i - y_im) = sqrt(2) z``, ``z ~ N(0, I)``; Bernoulli(sigmoid) per element for BCE),
    and use ``Lambda_i = (1/M) sum_m s_im s_im^T`` with ``s_im = grad_f nll(f_i, y_im)``
    (``p - onehot(y)`` for cross-entropy, ``sigmoid(f) - y`` for BCE; the one sampler of
    :func:`curvlab.linops._kronecker.sample_scores`).
    Since ``E[s s^T] = Lambda_i`` exactly (``E[2 z z^T] = 2 I`` for MSE), ``E[F_mc] = F``.
    For mean-reduced MSE this estimate is ``D`` times the empirical Fisher on the sampled
    targets, because :class:`EmpiricalFisherOperator` uses the per-sample mean loss.

    The draw is fixed when the operator is built and by :meth:`refresh` (which redraws),
    so ``F_mc`` is one symmetric PSD matrix across products: batch ``b``'s labels come
    from a generator seeded with ``seed + b``, so the data must be iterated in the same
    order each pass (a shuffling DataLoader is rejected). ``seed`` fixes the first draw;
    ``generator`` (a ``torch.Generator``) supplies the seeds of successive draws.
    """

    def __init__(self, model: Any, loss_fn: Any = None, data: Any = None, params: Any = None,
                 *, mode: str = "exact", num_samples: int = 1, seed: int | None = None,
                 generator: torch.Generator | None = None, train: bool = False,
                 cache_graph: bool = True, vectorize: bool | None = None) -> None:
        if mode not in FISHER_MODES:
            raise ValueError(f"mode must be one of {FISHER_MODES}, got {mode!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if seed is not None and generator is not None:
            raise TypeError("pass either seed or generator, not both")
        self.mode, self.num_samples = mode, num_samples
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        self.generator = generator
        self._first_seed = seed
        super().__init__(model, loss_fn, data, params, train=train, cache_graph=cache_graph,
                         vectorize=vectorize)
        loss_fn = self.objective.loss_fn
        if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)):
            raise TypeError(f"FisherOperator supports nn.CrossEntropyLoss, nn.MSELoss and "
                            f"nn.BCEWithLogitsLoss, got {type(loss_fn).__name__}; use "
                            f"GGNOperator or EmpiricalFisherOperator for other losses")
        if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (
                loss_fn.weight is not None or loss_fn.pos_weight is not None):
            raise ValueError("FisherOperator: BCEWithLogitsLoss with weight or pos_weight is "
                             "not a log-likelihood; drop them or use GGNOperator")
        if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is not None:
            raise ValueError("FisherOperator: CrossEntropyLoss with class weights is not a "
                             "log-likelihood; drop weight= or use GGNOperator")
        data = self.objective.data
        if mode == "mc" and isinstance(data, DataLoader) and isinstance(data.sampler,
                                                                       RandomSampler):
            raise ValueError("FisherOperator(mode='mc') needs the same batch order on every "
                             "pass; build the DataLoader with shuffle=False")

    def refresh(self) -> None:
        """Re-read the parameters and, in ``"mc"`` mode, draw new labels."""
        super().refresh()
        if self._first_seed is not None:
            self.seed, self._first_seed = self._first_seed, None
        else:
            self.seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def _output_matrix(self, index: int, weight: float, outputs: torch.Tensor,
                       targets: Any) -> OutputMatrix:
        obj = self.objective
        if self.mode == "exact":
            return canonical_fisher(obj, weight, outputs, targets)
        scale = loss_term_scale(obj, weight, outputs, targets)
        gen = torch.Generator(device=outputs.device).manual_seed(self.seed + index)
        m = self.num_samples
        S = torch.stack([sample_scores(obj.loss_fn, outputs, gen) for _ in range(m)])
        # per-term weights (ignored targets 0): sqrt(c_t) s_t keeps E[s s^T] = c_t Lambda_t
        if isinstance(scale, torch.Tensor):
            return _rank_one_sum(S * scale.sqrt(), 1.0 / m)
        return _rank_one_sum(S, scale / m)
