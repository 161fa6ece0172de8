"""Deep-linear-network theory of local versus BP-SSL updates.

From *Can Local Learning Match Self-Supervised Backpropagation?* (arXiv 2601.21683): with
orthonormal weights and the optimal prediction matrices ``B_l``, the local update of every layer
equals the BP-SSL gradient element-wise; random ``B``, non-orthogonal weights and ReLU break it
(cosine falling towards the input); with shrinking widths, context from the top layer (direct
feedback) is closer to BP than context from the same layer; in a linear CNN, computing the loss
without pooling (``B`` coupling positions) is exact while global pooling is not.

Modules: :mod:`~.objective` (the score loss and its gradient), :mod:`~.weights` (orthonormal and
semi-orthogonal initialisations), :mod:`~.optimal_b` (closed form and fitted ``B``),
:mod:`~.linear_mlp` and :mod:`~.linear_cnn` (local and BP gradients, explicit and by autograd),
:mod:`~.data` (positive pairs), :mod:`~.cases` (the statements, :func:`run_all`),
:mod:`~.report` (table and figure), :mod:`~.metrics` (cosine, relative error).
"""

from locallearn.theory.cases import (
    compare,
    direct_feedback,
    exactness,
    non_orthogonal,
    random_b,
    relu,
    run_all,
    spatial_dependence,
)
from locallearn.theory.metrics import cosine, rel_error
from locallearn.theory.optimal_b import closed_form_b, fit_b
from locallearn.theory.report import format_table, plot
from locallearn.theory.weights import conv_weights, mlp_weights, semi_orthogonal

__all__ = [
    "closed_form_b",
    "compare",
    "conv_weights",
    "cosine",
    "direct_feedback",
    "exactness",
    "fit_b",
    "format_table",
    "mlp_weights",
    "non_orthogonal",
    "plot",
    "random_b",
    "rel_error",
    "relu",
    "run_all",
    "semi_orthogonal",
    "spatial_dependence",
]
