from curvlab.linalg.cg import cg as cg
from curvlab.linalg.cg import steihaug_cg as steihaug_cg
from curvlab.linalg.factor import modified_cholesky as modified_cholesky
