"""torch.optim optimizers: Shampoo, SOAP, KL-Shampoo, KL-SOAP, Muon, PSGD-Kron, K-FAC,
natural gradient, Hessian-free, L-BFGS; the SAM / ASAM wrapper around any of torch's."""

from curvlab.optim.hessian_free import HessianFree as HessianFree
from curvlab.optim.kfac import KFAC as KFAC
from curvlab.optim.kl_shampoo import KLSOAP as KLSOAP
from curvlab.optim.kl_shampoo import KLShampoo as KLShampoo
from curvlab.optim.lbfgs import LBFGS as LBFGS
from curvlab.optim.muon import Muon as Muon
from curvlab.optim.muon import muon_param_groups as muon_param_groups
from curvlab.optim.natural_gradient import NaturalGradient as NaturalGradient
from curvlab.optim.psgd import PSGDKron as PSGDKron
from curvlab.optim.sam import SAM as SAM
from curvlab.optim.sam import asam_param_groups as asam_param_groups
from curvlab.optim.sam import frozen_batchnorm_stats as frozen_batchnorm_stats
from curvlab.optim.shampoo import Shampoo as Shampoo
from curvlab.optim.soap import SOAP as SOAP
