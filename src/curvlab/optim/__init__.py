
from curvlab.optim.lbfgs import LBFGS as LBFGS
