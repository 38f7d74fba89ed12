
from curvlab.linalg.matfuncs import MatrixFunctionError as MatrixFunctionError
from curvlab.linalg.matfuncs import coupled_newton_inverse_root as coupled_newton_inverse_root
from curvlab.linalg.matfuncs import eigenbasis_qr_refresh as eigenbasis_qr_refresh
from curvlab.linalg.matfuncs import matrix_inverse_root as matrix_inverse_root
from curvlab.linalg.matfuncs import newton_schulz as newton_schulz
from curvlab.linalg.matfuncs import symmetric_eigh as symmetric_eigh
