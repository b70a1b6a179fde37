"""timm and transformers import torchvision: import it first, also where its wheel does not
match this torch (``sparseforge.compat.import_torchvision``)."""
from sparseforge.compat import import_torchvision

try:
    import_torchvision()
except ImportError:
    pass  # no torchvision: the timm tests skip (importorskip), transformers does without it
