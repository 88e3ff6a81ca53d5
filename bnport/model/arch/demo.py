"""The embedded demo model's architecture: insightface IResNet (same blocks, BN placement and head as
`iresnet.py`) narrowed to width 8 with one block per stage, for 32x32 inputs and a 64-d embedding. It is trained on
MNIST digits as a verification problem by `tools/train_demo.py`; its weights ship in `bnport/demo/assets/`.
"""
from __future__ import annotations

from bnport.model.arch._registry import register_model
from bnport.model.arch.iresnet import IBasicBlock, IResNet
from bnport.demo import DEMO_INPUT_SIZE, DEMO_MODEL


@register_model(DEMO_MODEL, input_size=DEMO_INPUT_SIZE)
def iresnet_demo(**kwargs) -> IResNet:
    """Demo model: IResNet blocks, one per stage, width 8, 64-d embedding, 32x32 input (MNIST digits)."""
    kwargs = {"width": 8, "num_features": 64, "input_size": DEMO_INPUT_SIZE[0], **kwargs}
    return IResNet(IBasicBlock, [1, 1, 1, 1], **kwargs)
