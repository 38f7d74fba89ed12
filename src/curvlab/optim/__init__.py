
from curvlab.optim.lbfgs import LBFGS as LBFGS
from curvlab.optim.muon import Muon as Muon
from curvlab.optim.muon import muon_param_groups as muon_param_groups
from curvlab.optim.shampoo import Shampoo as Shampoo
from curvlab.optim.soap import SOAP as SOAP
