"""Re-run a network from one layer onward, reusing cached activations.

A bit-flip search scores one trial flip per quantized layer; a flip in a layer changes only
what depends on that layer, so everything computed before it (and every branch that does not
pass through it, such as a residual shortcut) can be reused from one clean forward pass.

:class:`IncrementalForward` traces the model once with :mod:`torch.fx` (quantized layers kept
as opaque calls, so a flipped weight is seen at call time), and for each quantized layer works
out the nodes downstream of it (its *plan*) and the values those nodes read from outside it.
:meth:`~IncrementalForward.prime` runs the whole graph once and keeps exactly those values;
:meth:`~IncrementalForward.rerun` recomputes one layer's plan with the layer's current
weights. Every node runs the same operation on the same inputs as the model's own forward, so
a rerun's output equals ``model(x)`` bit for bit (tested for every registered architecture).

In-place operations are replaced by their out-of-place forms (``+=`` by ``+``, ``relu_`` by
``relu``, ``nn.ReLU(inplace=True)`` by a non-inplace copy): they compute the same values but
never overwrite a cached activation.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from .quantization import QuantLayer

_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv,
                      operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
                      operator.ipow: operator.pow, operator.iand: operator.and_,
                      operator.ior: operator.or_, operator.ixor: operator.xor,
                      operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
                      operator.imatmul: operator.matmul}


class NotTraceable(RuntimeError):
    """The model cannot be traced into a graph (data-dependent control flow, ...)."""


class _Tracer(fx.Tracer):
    """Keeps attackable layers (any module with a ``bit_format``: quantized, per-channel int8
    and float-format layers) and torch.nn's own modules as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, QuantLayer) or getattr(m, "bit_format", None) is not None
                or super().is_leaf_module(m, qualname))


def _out_of_place(node: fx.Node, modules: dict[str, nn.Module],
                  copies: dict[str, nn.Module]) -> None:
    """Rewrite ``node`` (in the graph) to the out-of-place form of its operation."""
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            node.target = _INPLACE_OPERATORS[node.target]
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            namespace = getattr(node.target, "__module__", None)
            for ns in (torch, torch.nn.functional):
                if getattr(ns, name, None) is node.target and hasattr(ns, name[:-1]):
                    node.target = getattr(ns, name[:-1])
                    break
            else:
                raise NotTraceable(f"in-place function {namespace}.{name} has no out-of-place "
                                   f"form known to the incremental forward")
        if node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.startswith("_"):
            if not hasattr(torch.Tensor, name[:-1]):
                raise NotTraceable(f"in-place method Tensor.{name} has no out-of-place form")
            node.target = name[:-1]
        if node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_module":
        module = modules[node.target]
        if getattr(module, "inplace", False):
            if node.target not in copies:
                clone = copy.copy(module)  # shallow: shares every tensor, only the flag differs
                clone.inplace = False
                copies[node.target] = clone


class IncrementalForward:
    """Forward passes of ``model`` that restart at one of ``layers`` (names of its modules).

    Usage::

        engine = IncrementalForward(model, [name for name, _ in quant_layers(model)])
        out = engine.prime(x)             # == model(x); caches what the reruns need
        flip a bit of layer "layer2.0.conv1"
        out2 = engine.rerun("layer2.0.conv1")   # == model(x) with the flipped bit
        engine.commit("layer2.0.conv1")   # keep the flip: the cache follows it

    The cache belongs to the input of the last :meth:`prime` and to the weights at that time
    (updated by :meth:`commit`); anything else that changes the model in between calls for a
    new :meth:`prime`. Raises :class:`NotTraceable` when the model cannot be traced.
    """

    def __init__(self, model: nn.Module, layers: list[str]):
        self.model = model
        try:
            graph = _Tracer().trace(model)
        except Exception as err:  # fx raises many kinds of errors on untraceable code
            raise NotTraceable(f"{type(model).__name__} cannot be traced with torch.fx: "
                               f"{err}") from err
        self.modules = dict(model.named_modules())
        self._module_copies: dict[str, nn.Module] = {}
        for node in graph.nodes:
            _out_of_place(node, self.modules, self._module_copies)
        self.nodes = list(graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise NotTraceable("the incremental forward needs a model with exactly one input")
        self.input_node = placeholders[0]
        self.output_node = next(n for n in self.nodes if n.op == "output")
        layer_nodes = {}
        for n in self.nodes:
            if n.op == "call_module" and n.target in layers:
                if n.target in layer_nodes:
                    raise NotTraceable(f"layer {n.target} is called more than once in forward")
                layer_nodes[n.target] = n
        missing = [name for name in layers if name not in layer_nodes]
        if missing:
            raise NotTraceable(f"layers not called in the traced forward: {', '.join(missing)}")
        self.layer_nodes = layer_nodes
        # Per layer: its downstream nodes in execution order, and what they read from outside.
        self.plans: dict[str, list[fx.Node]] = {}
        self.reads: dict[str, set[fx.Node]] = {}
        for name, start in layer_nodes.items():
            downstream = {start}
            plan = []
            for n in self.nodes[self.position[start]:]:
                if n is start or any(a in downstream for a in n.all_input_nodes):
                    downstream.add(n)
                    plan.append(n)
            self.plans[name] = plan
            self.reads[name] = {a for n in plan for a in n.all_input_nodes
                                if a not in downstream}
        self.cached_nodes = set().union(*self.reads.values()) if self.reads else set()
        self.cache: dict[fx.Node, object] = {}
        self.output = None
        # Free each computed value after its last use within a plan (keeps memory low).
        self._last_use = {}
        for name, plan in self.plans.items():
            last = {}
            for i, n in enumerate(plan):
                for a in n.all_input_nodes:
                    last[a] = i
            frees = [[] for _ in plan]
            for a, i in last.items():
                frees[i].append(a)
            self._last_use[name] = frees

    # -----------------------------------------------------------------------------------------

    def _run_node(self, n: fx.Node, env: dict):
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if n.op == "call_module":
            module = self._module_copies.get(n.target) or self.modules[n.target]
            return module(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "get_attr":
            obj = self.model
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        if n.op == "output":
            return args[0]
        raise NotTraceable(f"unexpected graph node {n.op}")

    def prime(self, x: torch.Tensor):
        """Full forward on ``x`` (= ``model(x)``), keeping the values the reruns read."""
        env = {self.input_node: x}
        cache = {self.input_node: x} if self.input_node in self.cached_nodes else {}
        users_left = {n: len(n.users) for n in self.nodes}
        for n in self.nodes:
            if n.op == "placeholder":
                continue
            env[n] = self._run_node(n, env)
            if n in self.cached_nodes:
                cache[n] = env[n]
            for a in n.all_input_nodes:  # drop values nobody reads any more
                users_left[a] -= 1
                if users_left[a] == 0 and a is not self.input_node:
                    env.pop(a, None)
        self.cache = cache
        self.output = env[self.output_node]
        return self.output

    def rerun(self, layer: str, keep: bool = False):
        """Output of the model with ``layer``'s current weights, everything upstream of it taken
        from the cache. ``keep``: return ``(output, values)`` where ``values`` are the
        recomputed activations the cache holds, for :meth:`commit`."""
        if self.output is None:
            raise RuntimeError("call prime(x) before rerun()")
        env = dict(self.cache)
        plan, frees, reads = self.plans[layer], self._last_use[layer], self.reads[layer]
        kept = {}
        for n, free in zip(plan, frees):
            env[n] = self._run_node(n, env)
            if keep and n in self.cached_nodes:
                kept[n] = env[n]
            for a in free:
                if a not in reads:
                    env.pop(a, None)
        out = env[self.output_node]
        return (out, kept) if keep else out

    def commit(self, layer: str, rerun_result: tuple | None = None):
        """Take ``layer``'s current weights into the cache (after keeping a flip in it), from
        ``rerun(layer, keep=True)`` at these weights or by such a rerun; returns the output."""
        out, kept = rerun_result if rerun_result is not None else self.rerun(layer, keep=True)
        self.cache.update(kept)
        self.output = out
        return out
