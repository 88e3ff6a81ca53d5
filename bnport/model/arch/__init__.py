"""Architecture registry: insightface IResNet and MobileFaceNet (arcface_torch parameter names and BN placement,
so a real `backbone.pth` loads with strict key matching),
tiny variants for tests, and the embedded demo model (`iresnet_demo`)."""
from bnport.model.arch._registry import ModelEntry, create_model, get_entry, list_models, register_model
from bnport.model.arch import demo, iresnet, mobilefacenet  # noqa: F401  (registers the models)

__all__ = ["ModelEntry", "create_model", "get_entry", "list_models", "register_model"]
