"""hybridzoo: CNN–Transformer hybrid networks, faithful to their papers.

The whole public entry point::

    import hybridzoo
    hybridzoo.list_models("cvt*")
    model = hybridzoo.create_model("cvt_13", num_classes=10)
    hybridzoo.model_card("cvt_13").reported
"""

from __future__ import annotations

from hybridzoo.factory import create_model, load_weights, model_card
from hybridzoo.registry import ModelCard, list_models, register_model

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_card", "load_weights", "register_model", "ModelCard", "__version__"]
