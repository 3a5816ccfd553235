"""Batch norms folded into their convolutions: same outputs, same module names, nothing folded that must not be."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from pipeline.models.folding import fold_batch_norms


def trained_looking(model: nn.Module) -> nn.Module:
    """Batch norms with the running statistics and affine terms of a trained model, so folding has work to do."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def test_folded_classifiers_give_the_same_outputs_and_keep_their_module_names():
    x = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    for build, pairs in ((torchvision.models.resnet18, 20), (torchvision.models.mobilenet_v3_small, 34)):
        torch.manual_seed(0)
        model = trained_looking(build(num_classes=10))
        names = [name for name, _ in model.named_modules()]
        before = outputs(model, x)
        assert fold_batch_norms(model) == pairs
        assert [name for name, _ in model.named_modules()] == names
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        torch.testing.assert_close(outputs(model, x), before, rtol=1e-4, atol=1e-4)
        assert torch.equal(outputs(model, x).argmax(1), before.argmax(1))


class TwoReaders(nn.Module):
    """A convolution whose output feeds a batch norm and a second branch: folding would change the branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(y))


def test_a_convolution_read_twice_or_a_kept_layer_is_not_folded():
    model = trained_looking(TwoReaders())
    x = torch.rand(2, 3, 16, 16)
    before = outputs(model, x)
    assert fold_batch_norms(model, keep=frozenset({"conv2"})) == 0
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.BatchNorm2d)
    assert fold_batch_norms(model) == 1  # conv2 -> bn2 only
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
    torch.testing.assert_close(outputs(model, x), before, rtol=1e-4, atol=1e-4)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace a branch on a value
            x = -x
        return self.bn(self.conv(x))


def test_an_untraceable_or_training_model_is_left_as_it_is():
    assert fold_batch_norms(trained_looking(DataDependent())) == 0
    training = TwoReaders().train()
    assert fold_batch_norms(training) == 0 and isinstance(training.bn2, nn.BatchNorm2d)
