"""Krylov methods, estimators, factorizations and matrix functions on operators."""

from curvlab.linalg.cg import cg as cg
from curvlab.linalg.cg import steihaug_cg as steihaug_cg
from curvlab.linalg.estimators import DiagonalEstimate as DiagonalEstimate
from curvlab.linalg.estimators import Quadrature as Quadrature
from curvlab.linalg.estimators import SpectralDensity as SpectralDensity
from curvlab.linalg.estimators import TraceEstimate as TraceEstimate
from curvlab.linalg.estimators import diagonal as diagonal
from curvlab.linalg.estimators import hutchinson as hutchinson
from curvlab.linalg.estimators import hutchpp as hutchpp
from curvlab.linalg.estimators import quadratic_form as quadratic_form
from curvlab.linalg.estimators import slq as slq
from curvlab.linalg.factor import modified_cholesky as modified_cholesky
from curvlab.linalg.krylov import EigenResult as EigenResult
from curvlab.linalg.krylov import LanczosProcess as LanczosProcess
from curvlab.linalg.krylov import lanczos as lanczos
from curvlab.linalg.krylov import power_iteration as power_iteration
from curvlab.linalg.matfuncs import MatrixFunctionError as MatrixFunctionError
from curvlab.linalg.matfuncs import coupled_newton_inverse_root as coupled_newton_inverse_root
from curvlab.linalg.matfuncs import eigenbasis_qr_refresh as eigenbasis_qr_refresh
from curvlab.linalg.matfuncs import matrix_inverse_root as matrix_inverse_root
from curvlab.linalg.matfuncs import newton_schulz as newton_schulz
from curvlab.linalg.matfuncs import symmetric_eigh as symmetric_eigh
from curvlab.linalg.operator import MatvecOperator as MatvecOperator
from curvlab.linalg.operator import as_operator as as_operator
