"""What torch.fx says about a model's dataflow: conv+BN pairs and cuts.

Restructuring and fusion need to know which ``nn.Conv2d`` feeds exactly one
``nn.BatchNorm2d`` (and nothing else); RSD's mixture needs to know that a module's
output is a *cut* of the network (every path from the input to the logits passes
through it), so that replacing it by 3B rows gives 3B rows of logits and no skip
connection joins B rows to 3B. Both come from one symbolic trace in which
reparameterizable blocks (and any module asked for) are leaves.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from torch import fx, nn

from .blocks import Reparameterizable
from .errors import RSDError


class TraceError(RSDError):
    """torch.fx could not trace the model (data-dependent control flow, say)."""


class _Tracer(fx.Tracer):
    def __init__(self, leaves: Collection[str] = ()) -> None:
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.leaves or isinstance(m, Reparameterizable)
                or super().is_leaf_module(m, qualname))


def trace(model: nn.Module, leaves: Collection[str] = (), *, training: bool | None = None) -> fx.Graph:
    """The fx graph of ``model``, with the modules named in ``leaves`` kept whole.

    ``training`` traces the forward of that mode (the model's mode is restored after);
    None: the model's current mode.
    """
    was_training = model.training
    try:
        if training is not None:
            model.train(training)
        return _Tracer(leaves).trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {first}") from None
    finally:
        model.train(was_training)


def _calls(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Module name -> the nodes that call it."""
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    return calls


def conv_bn_pairs(model: nn.Module, graph: fx.Graph | None = None) -> list[tuple[str, str]]:
    """``(conv, bn)`` module names where a ``Conv2d``'s only consumer is a ``BatchNorm2d``.

    Each module of a pair is called once in the graph (a shared module is left alone),
    and the BN is a plain ``nn.BatchNorm2d`` with running statistics (subclasses that do
    more, such as BN fused with an activation, are not pairs). The graph is the eval-mode
    forward's (what is deployed), whatever mode the model is in, so the answer never
    depends on it (auxiliary heads that run only in training are not seen).
    """
    graph = trace(model, training=False) if graph is None else graph
    modules = dict(model.named_modules())
    calls = _calls(graph)
    pairs = []
    for name, nodes in calls.items():
        bn = modules.get(name)
        if type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or len(nodes) != 1:
            continue
        source = nodes[0].args[0] if nodes[0].args else None
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        conv_name = str(source.target)
        if (type(modules.get(conv_name)) is nn.Conv2d and len(calls[conv_name]) == 1
                and len(source.users) == 1):
            pairs.append((conv_name, name))
    return pairs


def non_cuts(graph: fx.Graph, names: Iterable[str]) -> dict[str, str]:
    """Of the module ``names`` (leaves of ``graph``), those that are not cuts, with why."""
    calls = _calls(graph)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    why: dict[str, str] = {}
    for name in names:
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            why[name] = ("it is not called in the forward" if not nodes
                         else f"it is called {len(nodes)} times in the forward")
            continue
        # Walk forward from the inputs without passing through the point: reaching the
        # output means a path (a skip connection) goes around it.
        seen, todo = set(), list(inputs)
        while todo:
            node = todo.pop()
            if node in seen or node is nodes[0]:
                continue
            seen.add(node)
            todo.extend(node.users)
        if any(n.op == "output" for n in seen):
            why[name] = "a path from the input to the logits goes around it (a skip connection)"
    return why
