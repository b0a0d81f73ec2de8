"""Quantized Conv2d and Linear layers (docs/algorithms.md section 1).

Every Conv2d and Linear of a model is one of these. A layer has two modes:

- *training mode* (default): the weight is a float parameter; every forward recomputes the
  symmetric per-layer step ``max|W| / half_lvls`` and uses ``round(clamp(W)/step) * step``;
  the backward pass is the straight-through estimator (the gradient reaches ``W`` unchanged).
  With ``n_bits == 1`` the layer is binarized: ``sign(W) * mean|W|`` (sign(0) = +1, see below).
- *integer mode* (:meth:`QuantLayer.to_integer`, used by the attacks): the weight parameter is
  replaced once by its integer code ``q``, the step is frozen, and the forward uses ``q * step``.
  Gradients with respect to the weight parameter are then ``dLoss/dq``. Bit flips act on ``q``
  through :meth:`QuantLayer.flip_bit` (layout in :mod:`models.bits`).

The state dict carries ``weight``, ``bias``, ``step_size`` (a 0-d tensor) and ``b_w`` (shape
[N, 1], the bit values as floats), exactly as the public code's checkpoints do (it assigns the
0-d ``max|W| / half_lvls`` to ``step_size`` at every forward), so either side loads the other's
files.

Binarized layers and the BFA repository (elliothe/BFA). Its README trains binarized networks
with the binarization block at the end of its ``models/quantization.py`` uncommented; that block
is the public binarized layer here: step ``mean|W|`` (recomputed every forward), forward
``torch.sign(W) * step`` for convolutions and linear layers alike, backward ``grad / step``
through ``sign`` times the ``* step`` of the forward (the straight-through estimator: ``W`` gets
the gradient of the binarized weight, up to rounding of ``(g * step) / step``; ours passes it
unchanged), and ``__reset_weight__`` stores ``sign(W)`` as the integer weight. Its
``models/binarization.py`` is imported by no model of the repository (its ``quan_Linear``
multiplies by the step twice in the float forward); it is not the public function and is not
mirrored. Differences:

- *deliberate*: ``torch.sign(0) = 0`` gives a third level, 0, that one bit cannot hold (the
  public bit conversion reads it as -1: ``int2bin(0) = 0.5`` truncated to bit 0); ours maps an
  exactly-zero weight to +1, so every code is +1 or -1. :func:`use_public_sign` selects the
  public ``torch.sign`` on a model's binarized layers (float forward and integer codes; a zero
  code is then read and flipped as the public BFA reads it, as -1). Only exact zeros differ.
- ``b_w``: the public 1-bit layers store ``[-1]``, ours ``[-2]`` (:mod:`models.bits`: bit 1 means
  -1, flipping it changes the code by -2 or +2). The public BFA's use of its ``[-1]`` is in
  :mod:`attacks.bfa` (``public_binary_mask``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import bits as bitlib


class _QuantizeSTE(torch.autograd.Function):
    """``round(clamp(w, -h*step, h*step) / step) * step`` forward, identity backward."""

    @staticmethod
    def forward(ctx, weight, step, half_lvls):
        # One new tensor and three in-place passes. round(clamp(v)) == clamp(round(v)) because
        # the bounds are integers, so the codes are those of docs/algorithms.md section 1 bit for bit.
        return torch.div(weight, step).round_().clamp_(-half_lvls, half_lvls).mul_(step)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None


class _BinarizeSTE(torch.autograd.Function):
    """``sign(w) * scale`` forward (sign(0) = +1; ``torch.sign``, sign(0) = 0, when
    ``public_sign``), identity backward.

    This is the public binarization code's ``sign`` with gradient ``1/mean|W|`` multiplied by the
    detached ``mean|W|`` scale: the product passes the gradient to ``W`` unchanged.
    """

    @staticmethod
    def forward(ctx, weight, scale, public_sign=False):
        if public_sign:
            return torch.sign(weight) * scale
        return torch.where(weight >= 0, scale, -scale)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None


def _integer_codes(weight: torch.Tensor, step: torch.Tensor, n_bits: int,
                   public_sign: bool = False) -> torch.Tensor:
    """Float tensor of the integer codes of ``weight`` for a given step (no gradient)."""
    if n_bits == 1:
        if public_sign:
            return torch.sign(weight)
        return torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)
    half = bitlib.half_levels(n_bits)
    return torch.round(torch.clamp(weight / step, -half, half))


class QuantLayer:
    """Mixin with the quantization state and the bit API shared by conv and linear layers."""

    n_bits: int
    integer_mode: bool
    weight: nn.Parameter
    # Binarized layers only: code of an exactly-zero weight 0 (torch.sign, the public code)
    # instead of +1. Set with use_public_sign(); see the module docstring.
    public_sign: bool = False
    # A deployment-time encoding of the stored codes (DeepNcode, defenses/deepncode.py): its
    # NumberFormat, and the maps code -> stored word and stored word -> code. None: the weight
    # holds the codes themselves.
    stored_encoding: "bitlib.NumberFormat | None" = None
    _encode = _decode = None

    def _init_quant(self, n_bits: int) -> None:
        self.n_bits = bitlib.check_bits(n_bits)
        self.integer_mode = False
        self.register_buffer("step_size", torch.ones(()))
        self.register_buffer("b_w", bitlib.bit_values(n_bits, dtype=torch.float32).view(-1, 1))

    @property
    def bit_format(self) -> bitlib.IntFormat:
        """The stored format of the codes (:mod:`models.bits`): N-bit two's complement, or the
        stored words of an encoding (:meth:`set_stored_encoding`)."""
        if self.stored_encoding is not None:
            return self.stored_encoding
        return bitlib.IntFormat(self.n_bits)

    @torch.no_grad()
    def set_stored_encoding(self, fmt, encode, decode) -> None:
        """Store the codes as words of an encoding (integer mode only): ``weight`` then holds
        ``encode(codes)`` in ``fmt`` (what the attacks flip), and the forward reads
        ``decode(words)`` (docs/algorithms.md section 15)."""
        self._require_integer_mode()
        codes = self.int_weight()
        self.stored_encoding, self._encode, self._decode = fmt, encode, decode
        self.weight.copy_(encode(codes).to(self.weight.dtype))

    # -- step size -----------------------------------------------------------------------------
    @torch.no_grad()
    def compute_step(self) -> torch.Tensor:
        """Step of the current float weights: ``max|W| / half_lvls`` (``mean|W|`` if binarized)."""
        w = self.weight.detach()
        if self.n_bits == 1:
            scale = w.abs().mean()
        else:  # max|W| in one pass, without a temporary |W| tensor
            scale = torch.linalg.vector_norm(w, ord=float("inf")) / bitlib.half_levels(self.n_bits)
        # An all-zero layer would give step 0 and NaN codes; any positive step quantizes it to 0.
        return torch.clamp(scale, min=torch.finfo(w.dtype).tiny).reshape(())

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (differentiable, see module docstring).

        Under autocast (``--amp``) it is still computed in the weight's own dtype (float32):
        the step, the rounding and the clamp are exact, and only the convolution or matrix
        product that consumes the result runs in the lower precision.
        """
        device_type = self.weight.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._quantized_weight()
        return self._quantized_weight()

    def _quantized_weight(self) -> torch.Tensor:
        if self.integer_mode:
            if self.stored_encoding is not None:  # the codes the words are read as, with
                # dLoss/d(code) as the words' gradient (straight through the table)
                codes = self._decode(self.weight.detach()).to(self.weight.dtype)
                if not torch.is_grad_enabled():
                    return codes * self.step_size
                return (self.weight + (codes - self.weight).detach()) * self.step_size
            return self.weight * self.step_size
        step = self.compute_step()
        self.step_size.copy_(step)
        if self.n_bits == 1:
            return _BinarizeSTE.apply(self.weight, step, self.public_sign)
        return _QuantizeSTE.apply(self.weight, step, bitlib.half_levels(self.n_bits))

    # -- integer mode --------------------------------------------------------------------------
    @torch.no_grad()
    def to_integer(self) -> None:
        """Replace the float weight by its integer code and freeze the step (idempotent)."""
        if self.integer_mode:
            return
        step = self.compute_step()
        self.step_size.copy_(step)
        self.weight.copy_(_integer_codes(self.weight, step, self.n_bits, self.public_sign))
        self.integer_mode = True

    @torch.no_grad()
    def to_float(self) -> None:
        """Leave integer mode: the weight becomes ``q * step`` again (a training-mode weight)."""
        if not self.integer_mode:
            return
        if self.stored_encoding is not None:  # the codes the words are read as, unencoded
            self.weight.copy_(self.int_weight().to(self.weight.dtype))
            self.stored_encoding = self._encode = self._decode = None
        self.weight.mul_(self.step_size)
        self.integer_mode = False

    @torch.no_grad()
    def int_weight(self) -> torch.Tensor:
        """The integer codes as an int64 tensor (computed on the fly outside integer mode)."""
        if self.integer_mode:
            if self.stored_encoding is not None:
                return self._decode(self.weight.detach()).to(torch.int64)
            return self.weight.detach().round().to(torch.int64)
        return _integer_codes(self.weight, self.compute_step(), self.n_bits,
                              self.public_sign).to(torch.int64)

    def _require_integer_mode(self) -> None:
        if not self.integer_mode:
            raise RuntimeError("bit access needs integer mode: call to_integer() on the layer "
                               "or models.to_integer(model) first")

    @torch.no_grad()
    def set_int_weight(self, codes: torch.Tensor) -> None:
        """Overwrite the integer codes (integer mode only); codes must fit the N-bit range."""
        self._require_integer_mode()
        lo, hi = bitlib.code_range(self.n_bits)
        codes = torch.as_tensor(codes, device=self.weight.device)
        if codes.shape != self.weight.shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a weight of shape "
                             f"{tuple(self.weight.shape)}")
        if int(codes.min()) < lo or int(codes.max()) > hi:
            raise ValueError(f"codes outside the {self.n_bits}-bit range [{lo}, {hi}]")
        if self.stored_encoding is not None:
            codes = self._encode(codes)
        self.weight.copy_(codes.to(self.weight.dtype))

    def read_bit(self, index: int, bit: int) -> int:
        """Bit ``bit`` (0 = MSB) of the weight at flat index ``index``."""
        self._require_integer_mode()
        if self.stored_encoding is not None:
            value = self.weight.detach().reshape(-1)[index]
            return int(self.stored_encoding.to_bits(value)[bit])
        code = self._bit_codes(self.weight.detach().reshape(-1)[index])
        return int(bitlib.int_to_bits(code, self.n_bits)[bit])

    def _bit_codes(self, values: torch.Tensor) -> torch.Tensor:
        """int64 codes of stored weights as the bits see them: a binarized 0 (public sign) is
        read as -1, like the public ``int2bin(0) = 0.5`` truncated to bit 0."""
        codes = values.round().to(torch.int64)
        if self.n_bits == 1:
            codes = torch.where(codes == 0, -1, codes)
        return codes

    @torch.no_grad()
    def flip_bit(self, index, bit) -> None:
        """Flip bit ``bit`` (0 = MSB) of the weight(s) at flat index ``index`` (ints or tensors)."""
        self._require_integer_mode()
        flat = self.weight.view(-1)
        index = torch.as_tensor(index, device=flat.device, dtype=torch.int64)
        if self.stored_encoding is not None:
            flat[index] = self.stored_encoding.flip(flat[index], bit)
            return
        codes = self._bit_codes(flat[index])
        flat[index] = bitlib.flip_bits(codes, bit, self.n_bits).to(flat.dtype)

    def extra_repr(self) -> str:
        mode = ", integer" if self.integer_mode else ""
        return super().extra_repr() + f", n_bits={self.n_bits}{mode}"


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with N-bit weights (docs/algorithms.md section 1); same arguments plus ``n_bits``."""

    def __init__(self, *args, n_bits: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(n_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` with N-bit weights (docs/algorithms.md section 1); same arguments plus ``n_bits``."""

    def __init__(self, *args, n_bits: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(n_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """``(name, layer)`` of every quantized layer of ``model``, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLayer)]


def to_integer(model: nn.Module) -> nn.Module:
    """Put every quantized layer of ``model`` in integer mode (docs/algorithms.md section 1); returns it."""
    for _, layer in quant_layers(model):
        layer.to_integer()
    return model


def to_float(model: nn.Module) -> nn.Module:
    """Undo :func:`to_integer` (weights become ``q * step`` floats); returns the model."""
    for _, layer in quant_layers(model):
        layer.to_float()
    return model


def use_public_sign(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Binarized layers of ``model`` use the public ``torch.sign`` (sign(0) = 0) instead of
    sign(0) = +1 (module docstring). Call it before :func:`to_integer`; returns the model."""
    for name, layer in quant_layers(model):
        if layer.n_bits != 1:
            continue
        if layer.integer_mode:
            raise RuntimeError(f"layer {name} is already in integer mode: choose the sign "
                               f"before models.to_integer(model)")
        layer.public_sign = bool(enabled)
    return model


@torch.no_grad()
def settle_zero_codes(model: nn.Module) -> int:
    """Write -1 over every 0 code of the binarized layers (integer mode; they exist only with
    :func:`use_public_sign`): the value the public BFA writes when it rewrites such a layer
    (``bin2int(int2bin(0))``). Returns how many codes changed."""
    changed = 0
    for _, layer in quant_layers(model):
        if layer.n_bits == 1 and layer.integer_mode:
            zero = layer.weight == 0
            n = int(zero.sum())
            if n:
                layer.weight.masked_fill_(zero, -1.0)
                changed += n
    return changed


def quantize_module(module: nn.Module, n_bits: int) -> nn.Module:
    """Replace every ``nn.Conv2d`` / ``nn.Linear`` inside ``module`` by its quantized twin.

    Used to build the ImageNet models from torchvision's definitions; float weights that are
    already there are kept, so a pretrained float model becomes a quantized one.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, QuantLayer):
            continue
        if isinstance(child, nn.Conv2d):
            new = QuantConv2d(child.in_channels, child.out_channels, child.kernel_size,
                              stride=child.stride, padding=child.padding, dilation=child.dilation,
                              groups=child.groups, bias=child.bias is not None,
                              padding_mode=child.padding_mode, n_bits=n_bits)
        elif isinstance(child, nn.Linear):
            new = QuantLinear(child.in_features, child.out_features,
                              bias=child.bias is not None, n_bits=n_bits)
        else:
            quantize_module(child, n_bits)
            continue
        new = new.to(child.weight.device)
        with torch.no_grad():
            new.weight.copy_(child.weight)
            if child.bias is not None:
                new.bias.copy_(child.bias)
        setattr(module, name, new)
    return module
