
from curvlab.optim.hessian_free import HessianFree as HessianFree
from curvlab.optim.kfac import KFAC as KFAC
from curvlab.optim.lbfgs import LBFGS as LBFGS
from curvlab.optim.natural_gradient import NaturalGradient as NaturalGradient
