"""Batch norms folded into the convolutions before them, for inference: the same function, fewer passes over
memory (`fold_batch_norms`). Pairs are found by a torch.fx trace; the model keeps its modules and names (a folded
batch norm becomes nn.Identity), and a model fx cannot trace is left as it is. The model stage folds torchvision's
own classifiers only. Why: docs/design-notes.md#pipelinemodelsfoldingpy; measured: docs/performance.md"""

from __future__ import annotations

import logging

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)


def fold_batch_norms(model: nn.Module, keep: frozenset[str] = frozenset()) -> int:
    """Folds each Conv2d -> BatchNorm2d pair of an eval-mode model in place; returns how many. Modules named in
    `keep` (a hooked layer whose own output matters) are left alone."""
    if model.training:
        return 0
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - untraceable models simply run unfolded
        log.debug("not folding batch norms: %s cannot be traced (%s)", type(model).__name__, exc)
        return 0
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        conv = _conv_feeding_only(node, modules)
        if conv is None or calls[conv.target] != 1 or calls[node.target] != 1 or {conv.target, node.target} & keep:
            continue
        _replace(model, conv.target, fuse_conv_bn_eval(modules[conv.target], modules[node.target]))
        _replace(model, node.target, nn.Identity())
        folded += 1
    return folded


def _conv_feeding_only(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The Conv2d call whose output is this BatchNorm2d call's input and nothing else's."""
    if node.op != "call_module" or type(modules.get(node.target)) is not nn.BatchNorm2d:
        return None
    source = node.args[0] if node.args else None
    if (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
            and type(modules.get(source.target)) is nn.Conv2d):
        return source
    return None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
