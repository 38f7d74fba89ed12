
from curvlab.optim.muon import Muon, muon_param_groups
from curvlab.optim.shampoo import Shampoo
from curvlab.optim.soap import SOAP
