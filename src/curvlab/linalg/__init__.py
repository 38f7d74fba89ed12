
from curvlab.linalg.matfuncs import (
    MatrixFunctionError,
    coupled_newton_inverse_root,
    eigenbasis_qr_refresh,
    matrix_inverse_root,
    newton_schulz,
    symmetric_eigh,
)
