"""The four op families, each registered once as a ``supanalysis::`` custom op.

Each module holds the op's float64 reference, its launchers by name
(``<op>_reference``, ``<op>_cpu``, ``<op>_triton``, ``<op>_cuda``), the registration with
a fake implementation (for ``torch.compile``), and the public function.
"""

from . import activation_stats, coactivation, correlation, interference

__all__ = ["activation_stats", "coactivation", "correlation", "interference"]
