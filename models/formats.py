"""Attackable layers for number formats other than this tool's N-bit codes
(docs/algorithms.md section 1b, "number formats").

The bit search attacks any layer whose ``weight`` holds the weights *as stored* in memory and
whose ``bit_format`` names their :class:`models.bits.NumberFormat`. This module provides such
layers for two deployments besides the quantized layers of :mod:`models.quantization`:

- float weights stored as fp32, bf16 or fp16 (:class:`FormatConv2d`, :class:`FormatLinear`,
  built by :func:`to_float_format`): the format is the storage a memory fault hits, the
  arithmetic stays in the input's dtype;
- per-channel int8 as PyTorch deploys it (``torch.ao`` post-training static quantization,
  :func:`quantize_per_channel`): :func:`from_ao` builds an attackable float *twin* of the
  quantized model (:class:`ChannelQuantConv2d`, :class:`ChannelQuantLinear` holding the very
  int8 codes), :func:`write_back` puts the twin's (flipped) codes into the quantized model, and
  :class:`DeployedModel` measures accuracy on the quantized model with those codes.

:func:`plain_layers` turns a model of quantized layers back into plain ``nn.Conv2d`` /
``nn.Linear`` (float training, and the only types ``torch.ao`` recognises).

``torch.ao.quantization`` and the quantized tensor constructors warn that they are deprecated
(torch 2.14), and the default qconfigs' observers that ``reduce_range`` will be; these
functions use them on purpose and silence exactly those warnings.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bits import FloatFormat, IntFormat, NumberFormat, StoredWeights, get_format
from .quantization import QuantLayer

INT8_RANGE = (-128, 127)


@contextlib.contextmanager
def _quiet_ao():
    """Silence torch.ao's deprecation notices (we use the deprecated API deliberately)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quant")
        # the default qconfigs' own observers (reduce_range): not ours to change
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max")
        yield


class _KeepsStorage:
    """Keeps the stored dtypes through ``model.half()`` / ``.to(dtype)``: only devices change
    (the weight *is* the stored bit pattern; a dtype cast would silently change the format)."""

    _storage_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name).data for name in ("weight",) + self._storage_buffers}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            tensor = getattr(self, name)
            if tensor.dtype != before.dtype:
                tensor.data = before.to(tensor.device)
        return self


def _float_format(fmt: NumberFormat | str) -> FloatFormat:
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if not isinstance(fmt, FloatFormat):
        raise ValueError(f"float-format layers take fp32, bf16 or fp16, got {fmt.name}; "
                         f"int8 weights come from quantize_per_channel and from_ao")
    return fmt


def _conv_args(module: nn.Conv2d) -> dict:
    return dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                groups=module.groups, bias=module.bias is not None,
                padding_mode=module.padding_mode, device=module.weight.device)


def _stored(weight: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """A contiguous copy (flat indices in C order, as flip_bit reads them) in the storage dtype."""
    return weight.detach().to(fmt.storage_dtype).clone(memory_format=torch.contiguous_format)


def _set_bias(layer: nn.Module, bias: torch.Tensor | None) -> None:
    if bias is not None:
        layer.bias.data = bias.detach().to(device=layer.weight.device,
                                           dtype=torch.float32).clone()


# ---------------------------------------------------------------------------------------------
# Float formats
# ---------------------------------------------------------------------------------------------

class _FormatLayer(_KeepsStorage, StoredWeights):
    bit_format: FloatFormat

    def _init_format(self, fmt) -> None:
        self.bit_format = _float_format(fmt)
        self.weight = nn.Parameter(self.weight.detach().to(self.bit_format.storage_dtype))
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().float())

    def _weight_bias(self, x: torch.Tensor):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self.weight.to(x.dtype)
        if weight.requires_grad and weight.dtype != self.weight.dtype:
            # bf16/fp16: autograd would round dLoss/dW to the weight's dtype (fp16 gradients
            # underflow); keep the full-precision one for the bit search (models.bits.weight_grad)
            weight.register_hook(self._keep_full_grad)
        return weight, bias

    def _keep_full_grad(self, grad: torch.Tensor) -> None:
        self.full_grad = grad.detach()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", format={self.bit_format.name}"


class FormatConv2d(_FormatLayer, nn.Conv2d):
    """``nn.Conv2d`` whose weight is stored in a float format (dtype fp32, bf16 or fp16); the
    bias stays float32 and the convolution runs in the input's dtype. Same arguments as
    ``nn.Conv2d`` plus ``fmt``. Weights may be inf or NaN after a flip: no checks."""

    def __init__(self, *args, fmt: NumberFormat | str = "fp32", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_format(fmt)

    @classmethod
    def from_module(cls, module: nn.Conv2d, fmt: NumberFormat | str) -> "FormatConv2d":
        """A copy of ``module`` with its weights rounded to ``fmt`` (``.to(dtype)``)."""
        new = cls(module.in_channels, module.out_channels, module.kernel_size, fmt=fmt,
                  **_conv_args(module))
        new.weight.data = _stored(module.weight, new.bit_format)
        _set_bias(new, module.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, *self._weight_bias(x))


class FormatLinear(_FormatLayer, nn.Linear):
    """``nn.Linear`` whose weight is stored in a float format (see :class:`FormatConv2d`)."""

    def __init__(self, *args, fmt: NumberFormat | str = "fp32", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_format(fmt)

    @classmethod
    def from_module(cls, module: nn.Linear, fmt: NumberFormat | str) -> "FormatLinear":
        """A copy of ``module`` with its weights rounded to ``fmt`` (``.to(dtype)``)."""
        new = cls(module.in_features, module.out_features, bias=module.bias is not None,
                  fmt=fmt, device=module.weight.device)
        new.weight.data = _stored(module.weight, new.bit_format)
        _set_bias(new, module.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self._weight_bias(x))


# ---------------------------------------------------------------------------------------------
# Per-channel int8 (the twin of a torch.ao quantized layer)
# ---------------------------------------------------------------------------------------------

class _ChannelQuantLayer(_KeepsStorage, StoredWeights):
    """Per-channel affine int8: ``weight`` holds the codes -128..127 (float32), the forward
    uses ``(codes - zero_point) * scale`` per output channel, so ``weight.grad`` is
    ``dLoss/dcode``. ``ao_name`` is the name of the quantized module it mirrors (or None)."""

    bit_format = IntFormat(8)
    _storage_buffers = ("scale", "zero_point")
    ao_name: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # the codes 0, scale 1, zero point 0
        self._init_codes(torch.zeros_like(self.weight), 1.0, None, self.bias)

    def _init_codes(self, codes, scales, zero_points, bias) -> None:
        device = self.weight.device
        codes = torch.as_tensor(codes).detach().to(device=device, dtype=torch.float32)
        codes = codes.clone(memory_format=torch.contiguous_format)  # flat index = C order
        if codes.shape != self.weight.shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a weight of shape "
                             f"{tuple(self.weight.shape)}: pass one code per weight")
        check_int8(codes)
        channels = codes.shape[0]
        scales = torch.as_tensor(scales).detach().to(device=device, dtype=torch.float32)
        scales = scales.reshape(-1).expand(channels).clone()
        if zero_points is None:
            zero_points = torch.zeros(channels)
        zero_points = torch.as_tensor(zero_points).detach().to(device=device, dtype=torch.float32)
        zero_points = zero_points.reshape(-1).expand(channels).clone()
        self.weight = nn.Parameter(codes)
        self.register_buffer("scale", scales)
        self.register_buffer("zero_point", zero_points)
        if (bias is None) != (self.bias is None):
            raise ValueError("a bias for a layer built without one, or none for a layer with "
                             "one: build the layer with from_module")
        _set_bias(self, bias)

    def dequantized_weight(self) -> torch.Tensor:
        """``(codes - zero_point) * scale`` (differentiable in the codes)."""
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        return (self.weight - self.zero_point.view(shape)) * self.scale.view(shape)

    def _weight_bias(self, x: torch.Tensor):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self.dequantized_weight().to(x.dtype), bias

    def extra_repr(self) -> str:
        return super().extra_repr() + ", format=int8 per channel"


class ChannelQuantConv2d(_ChannelQuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with per-channel int8 weights (see :class:`_ChannelQuantLayer`)."""

    @classmethod
    def from_module(cls, module: nn.Conv2d, codes: torch.Tensor, scales: torch.Tensor,
                    zero_points: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> "ChannelQuantConv2d":
        """A layer of ``module``'s geometry (stride, padding, ...) holding ``codes`` with one
        scale and zero point per output channel (a single value is repeated; zero points
        default to 0) and ``bias`` (float; None: no bias)."""
        args = _conv_args(module)
        args["bias"] = bias is not None
        new = cls(module.in_channels, module.out_channels, module.kernel_size, **args)
        new._init_codes(codes, scales, zero_points, bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, *self._weight_bias(x))


class ChannelQuantLinear(_ChannelQuantLayer, nn.Linear):
    """``nn.Linear`` with per-channel int8 weights (see :class:`_ChannelQuantLayer`)."""

    @classmethod
    def from_module(cls, module: nn.Linear, codes: torch.Tensor, scales: torch.Tensor,
                    zero_points: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> "ChannelQuantLinear":
        """A layer of ``module``'s shape holding ``codes`` (as
        :meth:`ChannelQuantConv2d.from_module`)."""
        new = cls(module.in_features, module.out_features, bias=bias is not None,
                  device=module.weight.device)
        new._init_codes(codes, scales, zero_points, bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self._weight_bias(x))


def check_int8(codes: torch.Tensor) -> None:
    """Raise ValueError unless every value is an integer in -128..127."""
    lo, hi = INT8_RANGE
    bad = (codes != codes.round()) | (codes < lo) | (codes > hi)
    if bool(bad.any()):
        raise ValueError(f"{int(bad.sum())} int8 codes are not integers in [{lo}, {hi}]; "
                         f"change codes only through the layer's flip_bit")


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------

def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def plain_layers(model: nn.Module) -> nn.Module:
    """Replace, in place, every quantized layer (:class:`models.quantization.QuantLayer`, in
    training mode) by a plain ``nn.Conv2d`` / ``nn.Linear`` holding the same weight and bias
    Parameters (float training; the only types ``torch.ao`` quantizes). Returns ``model``."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    for name, layer in layers:
        if layer.integer_mode:
            raise ValueError(f"layer {name} is in integer mode: call models.to_float(model) "
                             f"before plain_layers")
    for name, layer in layers:
        if isinstance(layer, nn.Conv2d):
            new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                            **_conv_args(layer), dtype=layer.weight.dtype)
        elif isinstance(layer, nn.Linear):
            new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            device=layer.weight.device, dtype=layer.weight.dtype)
        else:
            raise ValueError(f"layer {name} is a {type(layer).__name__}: plain_layers knows "
                             f"only Conv2d and Linear quantized layers")
        new.weight = layer.weight
        if layer.bias is not None:
            new.bias = layer.bias
        new.train(layer.training)
        _replace(model, name, new)
    return model


def to_float_format(model: nn.Module, name: str) -> nn.Module:
    """Replace, in place, every plain ``nn.Conv2d`` / ``nn.Linear`` (exact types, also inside
    fused ``torch.ao.nn.intrinsic`` modules) by :class:`FormatConv2d` / :class:`FormatLinear`
    storing its weights in format ``name`` (fp32, bf16 or fp16). Returns ``model``."""
    fmt = _float_format(name)
    targets = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    if not targets:
        raise ValueError("the model has no plain nn.Conv2d / nn.Linear layers: call "
                         "plain_layers(model) first on a model of quantized layers")
    for n, m in targets:
        cls = FormatConv2d if type(m) is nn.Conv2d else FormatLinear
        new = cls.from_module(m, fmt)
        new.train(m.training)
        _replace(model, n, new)
    return model


def _check_plain(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer) or getattr(m, "bit_format", None) is not None:
            raise ValueError(f"layer {name or type(m).__name__} is an attackable layer that "
                             f"torch.ao does not know: quantize the float model "
                             f"(plain_layers(model)) instead")


def _set_engine(backend: str) -> str:
    supported = torch.backends.quantized.supported_engines
    for engine in (backend, "x86", "fbgemm", "qnnpack"):
        if engine in supported:
            if engine != backend:
                warnings.warn(f"quantized engine {backend!r} is not supported here; "
                              f"using {engine!r}")
            torch.backends.quantized.engine = engine
            return engine
    raise ValueError(f"no quantized engine among {backend}, x86, fbgemm, qnnpack is supported "
                     f"by this torch build (it has {supported})")


def _first_tensor(batch) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):  # an (inputs, targets) batch of a data loader
        batch = batch[0]
    return batch.detach().float().cpu()


@torch.no_grad()
def quantize_per_channel(model: nn.Module, calibration_batches: Iterable[torch.Tensor],
                         backend: str = "x86") -> nn.Module:
    """PyTorch's own post-training static quantization of a float model (FX graph mode, CPU):
    ``get_default_qconfig_mapping(backend)`` (per-channel symmetric qint8 weights for x86 and
    fbgemm, per-tensor for qnnpack; quint8 activations), ``prepare_fx`` on a copy, the
    calibration batches (float input tensors, or ``(inputs, targets)`` pairs), ``convert_fx``.
    Sets ``torch.backends.quantized.engine`` to ``backend`` (or a supported fallback).
    Returns the converted GraphModule; ``model`` is not changed."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    _check_plain(model)
    engine = _set_engine(backend)
    batches = iter(calibration_batches)
    try:
        first = _first_tensor(next(batches))
    except StopIteration:
        raise ValueError("quantize_per_channel needs at least one calibration batch") from None
    float_model = copy.deepcopy(model).cpu().eval()
    with _quiet_ao():
        prepared = prepare_fx(float_model, get_default_qconfig_mapping(engine), (first,))
        prepared(first)
        for batch in batches:
            prepared(_first_tensor(batch))
        return convert_fx(prepared)


def _quantized_modules(ao_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the ao model's quantized conv / linear modules."""
    import torch.ao.nn.quantized as nnq
    from torch.ao.nn.quantized.modules.utils import WeightedQuantizedModule

    found = []
    for name, m in ao_model.named_modules():
        if isinstance(m, (nnq.Conv2d, nnq.Linear)):
            found.append((name, m))
        elif isinstance(m, WeightedQuantizedModule):
            raise ValueError(f"quantized module {name} is a {type(m).__name__}: from_ao "
                             f"supports only quantized Conv2d and Linear modules")
    if not found:
        raise ValueError("the model has no torch.ao quantized Conv2d / Linear modules: "
                         "quantize it first (quantize_per_channel, or prepare and convert)")
    return found


def _is_fused(model: nn.Module) -> bool:
    from torch.ao.nn.intrinsic import _FusedModule
    from torch.ao.quantization import QuantStub

    return any(isinstance(m, (_FusedModule, QuantStub)) for m in model.modules())


def _weight_params(qweight: torch.Tensor):
    """int8 codes, per-channel float scales and zero points of a quantized weight tensor."""
    codes = qweight.int_repr()
    if qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        if qweight.q_per_channel_axis() != 0:
            raise ValueError("per-channel weights quantized along an axis other than 0 are "
                             "not supported: quantize per output channel")
        return codes, qweight.q_per_channel_scales(), qweight.q_per_channel_zero_points()
    if qweight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        channels = codes.shape[0]
        return (codes, torch.full((channels,), qweight.q_scale(), dtype=torch.float64),
                torch.full((channels,), qweight.q_zero_point(), dtype=torch.int64))
    raise ValueError(f"unsupported weight quantization scheme {qweight.qscheme()}")


@torch.no_grad()
def from_ao(ao_model: nn.Module, float_model: nn.Module, fused: bool | None = None,
            check: bool = True) -> nn.Module:
    """The attackable twin of a ``torch.ao`` quantized model: a copy of ``float_model`` (same
    class, methods and module names) whose conv / linear layers are replaced by
    :class:`ChannelQuantConv2d` / :class:`ChannelQuantLinear` holding the quantized modules'
    int8 codes, scales, zero points and float biases: it computes in float what the quantized
    model computes with quantized activations, and the bit search can differentiate it.

    ``float_model`` is the model that was quantized. FX graph mode (:func:`quantize_per_channel`):
    the plain float model; ``fuse_fx`` folds BatchNorm into the convs as prepare_fx does (the
    fused modules carry the converted modules' names), every conv / linear of the twin takes
    its folded weights (quantized or not), the folded BatchNorms become ``nn.Identity`` and
    the layer names are the ao modules' names. Eager mode:
    the fused float model (``fuse_model()``), copied as it is; a layer inside a fused module
    (``ConvReLU2d``) is its ``[0]``, named ``<ao name>.0``. ``fused`` None detects eager mode
    (fused ``torch.ao.nn.intrinsic`` modules or a ``QuantStub`` in the float model).
    ``check`` verifies that the float weights round to the quantized codes (within one step),
    which catches a float model that is not the one quantized. ``float_model`` is not
    changed; the twin is in eval mode. Each twin layer's ``ao_name`` names its ao module."""
    import torch.ao.nn.quantized as nnq
    from torch.ao.nn.intrinsic import _FusedModule

    quantized = _quantized_modules(ao_model)
    if fused is None:
        fused = _is_fused(float_model)
    _check_plain(float_model)
    twin = copy.deepcopy(float_model).eval()
    if fused:
        folded = twin
    else:
        from torch.ao.quantization.quantize_fx import fuse_fx
        with _quiet_ao():
            folded = fuse_fx(copy.deepcopy(float_model).eval())
        kept = dict(folded.named_modules())
        for name, m in list(twin.named_modules()):
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in kept:
                _replace(twin, name, nn.Identity())  # folded into the conv before it
        inside_fused = {f"{name}.{child}" for name, m in kept.items()
                        if isinstance(m, _FusedModule) for child in m._modules}
        originals = dict(twin.named_modules())
        for name, m in kept.items():  # every folded conv / linear, quantized or not
            layer = m[0] if isinstance(m, _FusedModule) else m
            if (name not in inside_fused and type(layer) in (nn.Conv2d, nn.Linear)
                    and type(originals.get(name)) is type(layer)):
                _replace(twin, name, copy.deepcopy(layer))

    def layer_at(model, name):
        m = dict(model.named_modules()).get(name)
        if isinstance(m, _FusedModule):
            return m[0], f"{name}.0"
        return m, name

    for name, qmod in quantized:
        kind = nn.Conv2d if isinstance(qmod, nnq.Conv2d) else nn.Linear
        source, _ = layer_at(folded, name)
        target, target_name = layer_at(twin, name)
        for m in (source, target):
            if type(m) is not kind:
                what = "nothing" if m is None else f"a {type(m).__name__}"
                raise ValueError(f"quantized module {name} has {what} in the float model: pass "
                                 f"the float model that was quantized (fused=True for an "
                                 f"eager-mode fused model)")
        qweight = qmod.weight()
        codes, scales, zero_points = _weight_params(qweight)
        if check:
            _check_counterpart(name, source.weight, qweight)
        bias = qmod.bias()
        cls = ChannelQuantConv2d if kind is nn.Conv2d else ChannelQuantLinear
        layer = cls.from_module(target, codes, scales, zero_points,
                                None if bias is None else bias.detach().float())
        layer.ao_name = name
        _replace(twin, target_name, layer)
    return twin


def _check_counterpart(name: str, weight: torch.Tensor, qweight: torch.Tensor) -> None:
    if weight.shape != qweight.shape:
        raise ValueError(f"quantized module {name} has weights of shape {tuple(qweight.shape)}, "
                         f"the float model {tuple(weight.shape)}: pass the model that was "
                         f"quantized")
    _, scales, _ = _weight_params(qweight)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    error = (weight.detach().cpu().double() - qweight.dequantize().double()).abs()
    if bool((error > 1.01 * scales.view(shape)).any()):
        raise ValueError(f"the float weights of {name} do not round to its quantized codes: "
                         f"pass the float model that was quantized (or check=False)")


def _twin_layers(twin: nn.Module) -> list[tuple[str, _ChannelQuantLayer]]:
    return [(n, m) for n, m in twin.named_modules()
            if isinstance(m, _ChannelQuantLayer) and m.ao_name is not None]


@torch.no_grad()
def write_back(twin: nn.Module, ao_model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Write the twin's current codes (and scales, zero points, bias) into the ao model's
    quantized modules (``set_weight_bias``; per-tensor modules stay per tensor). ``names``:
    only these layers (the twin's layer names, as :func:`models.bits.bit_layers` lists them,
    or the ao modules' names)."""
    layers = _twin_layers(twin)
    if names is not None:
        wanted = set(names)
        unknown = wanted - {n for n, _ in layers} - {m.ao_name for _, m in layers}
        if unknown:
            raise ValueError(f"no twin layer named {', '.join(sorted(unknown))}: pass names "
                             f"from bit_layers(twin)")
        layers = [(n, m) for n, m in layers if n in wanted or m.ao_name in wanted]
    for name, layer in layers:
        codes = layer.weight.detach().cpu()
        check_int8(codes)
        codes = codes.to(torch.int8)
        scales = layer.scale.detach().cpu().double()
        zero_points = layer.zero_point.detach().cpu().long()
        module = ao_model.get_submodule(layer.ao_name)
        with _quiet_ao():
            if module.weight().qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                if bool((scales != scales[0]).any() or (zero_points != zero_points[0]).any()):
                    raise ValueError(f"layer {name} has several scales but its quantized module "
                                     f"is per tensor: keep one scale per layer")
                qweight = torch._make_per_tensor_quantized_tensor(
                    codes, float(scales[0]), int(zero_points[0]))
            else:
                qweight = torch._make_per_channel_quantized_tensor(codes, scales, zero_points, 0)
            bias = None if layer.bias is None else layer.bias.detach().cpu().float()
            module.set_weight_bias(qweight, bias)


class DeployedModel(nn.Module):
    """The quantized model with the twin's codes: ``forward`` writes back the codes of the
    twin layers that changed since the last call, then runs the ao model on the CPU and
    returns its float output on the input's device. Accuracy after flips on the twin is
    measured on this model. The twin is kept outside the module tree, so the deployed model
    has no attackable layers of its own (``bit_layers`` lists none)."""

    def __init__(self, twin: nn.Module, ao_model: nn.Module):
        super().__init__()
        layers = _twin_layers(twin)
        if not layers:
            raise ValueError("the twin has no int8 layers of an ao model: build it with "
                             "from_ao(ao_model, float_model)")
        object.__setattr__(self, "_twin", twin)
        self.ao_model = ao_model
        # the ao model holds the twin's codes as built by from_ao; write them once to be sure
        write_back(twin, ao_model)
        self._written = {name: layer.weight.detach().clone() for name, layer in layers}

    @property
    def twin(self) -> nn.Module:
        return self._twin

    def _apply(self, fn, recurse=True):
        return self  # the quantized model runs on the CPU only: .to(device) leaves it there

    def sync(self) -> list[str]:
        """Write back the layers whose codes changed since the last sync; their names."""
        changed = [name for name, layer in _twin_layers(self._twin)
                   if not torch.equal(layer.weight.detach(), self._written[name])]
        if changed:
            write_back(self._twin, self.ao_model, changed)
            layers = dict(_twin_layers(self._twin))
            for name in changed:
                self._written[name] = layers[name].weight.detach().clone()
        return changed

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sync()
        return self.ao_model(x.detach().cpu().float()).to(x.device)


__all__ = ["FormatConv2d", "FormatLinear", "ChannelQuantConv2d", "ChannelQuantLinear",
           "DeployedModel", "check_int8", "from_ao", "plain_layers", "quantize_per_channel",
           "to_float_format", "write_back"]
