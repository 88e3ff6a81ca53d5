"""The embedded demo model's architecture: insightface IResNet (same blocks, BN placement and head as
`iresnet.py`) narrowed to width 8 with one block per stage, for 32x32 inputs and a 64-d embedding. It is trained on
MNIST digits as a verification problem by `bnport/models/train_demo.py`; its weights ship in `bnport/models/demo/`.
"""
from __future__ import annotations

from bnport.arch._registry import register_model
from bnport.arch.iresnet import IBasicBlock, IResNet
from bnport.models import DEMO_INPUT_SIZE, DEMO_MODEL


@register_model(DEMO_MODEL, input_size=DEMO_INPUT_SIZE)
def iresnet_demo(**kwargs) -> IResNet:
    """Demo model: IResNet blocks, one per stage, width 8, 64-d embedding, 32x32 input (MNIST digits)."""
    kwargs = {"width": 8, "num_features": 64, "input_size": DEMO_INPUT_SIZE[0], **kwargs}
    return IResNet(IBasicBlock, [1, 1, 1, 1], **kwargs)
