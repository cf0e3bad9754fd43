"""Bridges to the libraries users already hold models in: timm, transformers, open_clip.

One module per library (``vlcore.integrations.timm`` ...): weight conversion into vlcore's blocks, and
``apply(model)`` that patches vlcore's kernels into the library's own modules. The peers are optional
(``pip install -e ".[interop]"``); importing a module whose library is missing raises ImportError naming it.

Importing this package first makes torchvision importable beside a CPU-only torch (see
:mod:`vlcore.integrations._torchvision_compat`), which timm and open_clip need.
"""

from vlcore.integrations import _torchvision_compat

_torchvision_compat.ensure()
