"""Fault models: which bit-flips a real attacker can make (docs/algorithms.md section 5b).

The public attacks may flip any bit of any weight. A :class:`FaultModel` restricts the bit
search (and the random flips) to the admissible ones:

- ``bit_positions``: the bits that may flip (0 = MSB, as every record counts them), e.g. only
  the MSB, or every bit but the MSB;
- ``direction``: ``0to1`` or ``1to0`` only (a DRAM cell that leaks charge flips one way);
- ``profile``: a vulnerability profile (what Rowhammer templating produces): only the listed
  cells can flip, each in its listed direction (:func:`read_profile` gives the file format);
- ``one_per_page``: at most one flip per memory page of ``page_bytes`` (4 KiB): a page is used
  once it holds a flip (DeepHammer's constraint: one exploitable flip per page and row);
- ``budget``: at most this many flips in the whole attack.

The memory layout (:class:`MemoryLayout`) is the one a weights file or a contiguous weight
buffer has: the attacked layers' weight tensors in model order (the search's order), each
flattened row-major and stored back to back from byte 0, each tensor aligned to its value size;
a value takes ``bit_format.bytes_per_value`` bytes (int8 and N <= 8-bit codes 1, fp16/bf16 2,
fp32 4), little-endian. Bit ``k`` (0 = MSB) of an ``n``-bit value at byte ``a`` is bit
``(n-1-k) % 8`` (0 = LSB) of byte ``a + (n-1-k) // 8``. Codes of fewer than 8 bits sit in the
low bits of their byte.

A :class:`FaultState` binds a fault model to a model: it builds the admissibility mask of a
layer's ``[weights, bits]`` candidates (used by :mod:`utils.bitsearch`), records the flips made
(pages used, budget spent) and checks a finished attack against the clean weights
(:meth:`FaultState.violations`).
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass
import re

import torch
import torch.nn as nn

from models.bits import Flip, bit_layers

DIRECTIONS = ("any", "0to1", "1to0")
PAGE_BYTES = 4096
_DIRECTION_ALIASES = {"0to1": 1, "0->1": 1, "01": 1, "1to0": 2, "1->0": 2, "10": 2}


@dataclass(frozen=True)
class FaultModel:
    """What the attacker's hardware allows (module docstring); the default allows every flip."""

    bit_positions: tuple[int, ...] | None = None
    direction: str = "any"
    profile: str | None = None
    one_per_page: bool = False
    page_bytes: int = PAGE_BYTES
    budget: int | None = None

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"flip direction must be one of {', '.join(DIRECTIONS)}, got "
                             f"{self.direction!r}")
        if self.page_bytes < 4 or self.page_bytes & (self.page_bytes - 1):
            raise ValueError(f"page size must be a power of two of at least 4 bytes (e.g. "
                             f"4096), got {self.page_bytes}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"flip budget must be at least 1, got {self.budget}")
        if self.bit_positions is not None:
            if not self.bit_positions or min(self.bit_positions) < 0:
                raise ValueError("allowed bit positions must be a non-empty list of bits "
                                 "counted from 0 = MSB")
            object.__setattr__(self, "bit_positions", tuple(sorted(set(self.bit_positions))))

    @property
    def unconstrained(self) -> bool:
        return (self.bit_positions is None and self.direction == "any" and self.profile is None
                and not self.one_per_page and self.budget is None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bit_positions"] = list(self.bit_positions) if self.bit_positions is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "FaultModel":
        d = dict(d or {})
        if d.get("bit_positions") is not None:
            d["bit_positions"] = tuple(d["bit_positions"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def label(self) -> str:
        """Short name for tables: ``none``, ``1/page``, ``0to1``, ``bits 0``, ``budget 10``, ..."""
        parts = []
        if self.bit_positions is not None:
            parts.append("bits " + _ranges(self.bit_positions))
        if self.direction != "any":
            parts.append(self.direction)
        if self.profile is not None:
            parts.append("profile")
        if self.one_per_page:
            parts.append("1/page" if self.page_bytes == PAGE_BYTES
                         else f"1/{self.page_bytes}B page")
        if self.budget is not None:
            parts.append(f"budget {self.budget}")
        return " + ".join(parts) if parts else "none"


# Named fault models of the threat-model work, as the defenses x attacks matrix takes them
# (docs/algorithms.md sections 5b and 13): every flip; one flip per 4 KiB page (DeepHammer);
# 0 -> 1 or 1 -> 0 only (a cell leaks one way); the MSB only.
FAULT_PRESETS = {
    "none": FaultModel(),
    "page": FaultModel(one_per_page=True),
    "0to1": FaultModel(direction="0to1"),
    "1to0": FaultModel(direction="1to0"),
    "msb": FaultModel(bit_positions=(0,)),
}


def fault_preset(name: str) -> FaultModel | None:
    """The fault model named ``name`` (:data:`FAULT_PRESETS`; ``none``: None, every flip);
    ValueError naming the presets otherwise."""
    if name not in FAULT_PRESETS:
        raise ValueError(f"unknown fault model {name!r}: use one of {', '.join(FAULT_PRESETS)}")
    fault = FAULT_PRESETS[name]
    return None if fault.unconstrained else fault


def _ranges(values: tuple[int, ...]) -> str:
    """``(0, 2, 3, 4, 7)`` -> ``"0,2-4,7"`` (the inverse of :func:`parse_bit_positions`)."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# The widest value of any attacked format (fp32): no bit position lies beyond it. Whether a
# position lies inside the attacked format is known once the model is loaded (check_applies).
MAX_VALUE_BITS = 32


def parse_bit_positions(text: str) -> tuple[int, ...]:
    """``"0"``, ``"1-7"``, ``"0,2,4-6"`` -> sorted bit positions (0 = MSB), each below
    :data:`MAX_VALUE_BITS`."""
    out = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"bit positions are numbers or ranges (0 = MSB), e.g. 0 or 1-7 or "
                             f"0,2,4-6; got {text!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"empty bit range {part!r} in {text!r}")
        if hi >= MAX_VALUE_BITS:
            raise ValueError(f"bit position {hi} in {text!r} lies beyond every number format "
                             f"(at most {MAX_VALUE_BITS} bits: positions 0-{MAX_VALUE_BITS - 1})")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def read_profile(path: str) -> list[tuple[int, int, int]]:
    """Cells of a vulnerability profile file: ``(byte offset, bit in byte, direction code)``.

    One cell per line: ``<byte offset> <bit> <direction>``, separated by spaces or commas; the
    offset in the weight layout (module docstring), decimal or ``0x`` hex; the bit within the
    byte, 0 = LSB (as memory profilers report it); the direction ``0to1`` or ``1to0`` (also
    ``0->1``, ``1->0``). ``#`` starts a comment (a header line must be one: a line that is not
    a cell is an error, never skipped). A cell listed with both directions flips both ways.
    Raises ValueError (with the line number) for anything else, for text that is not UTF-8 and
    for a file without cells (an attack under it could flip nothing).
    """
    from utils.textfiles import read_text

    cells = []
    for number, line in enumerate(read_text(path, "the profile").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if text:
            cells.append(_profile_cell(text, f"{path}:{number}", line))
    if not cells:
        raise ValueError(f"{path} holds no cells: a profile lists the vulnerable cells, one "
                         f"'<byte offset> <bit 0-7, 0 = LSB> <0to1|1to0>' per line")
    return cells


def _profile_cell(text: str, where: str, line: str) -> tuple[int, int, int]:
    """One profile line's cell (:func:`read_profile`); ValueError naming ``where``."""
    fields = [x for x in re.split(r"[\s,]+", text) if x]
    try:
        if len(fields) != 3:
            raise ValueError
        offset, bit = int(fields[0], 0), int(fields[1])
        direction = _DIRECTION_ALIASES[fields[2].lower()]
        if offset < 0 or not 0 <= bit <= 7:
            raise ValueError
    except (ValueError, KeyError):
        raise ValueError(f"{where}: a profile line is '<byte offset> <bit 0-7, 0 = LSB> "
                         f"<0to1|1to0>' (a header must start with #), got "
                         f"{line.strip()[:60]!r}") from None
    return offset, bit, direction


def check_applies(fault: FaultModel, model: nn.Module) -> None:
    """Raise ValueError when ``fault`` names what ``model``'s attacked weights do not have, so
    that a run never records a setting it could not apply: a bit position outside their format
    (positions 0 .. n_bits - 1 of every attacked layer) or a profile none of whose cells lies
    in them (the attack could flip nothing)."""
    layers = bit_layers(model)
    if not layers:
        raise ValueError("the model has no attacked layers")
    narrow = min((layer.bit_format for _, layer in layers), key=lambda f: f.n_bits)
    outside = [b for b in fault.bit_positions or () if b >= narrow.n_bits]
    if outside:
        raise ValueError(f"bit position(s) {_ranges(tuple(outside))} lie outside the attacked "
                         f"weights: {narrow.name} values have bits 0-{narrow.n_bits - 1} "
                         f"(0 = MSB); give positions inside them (--fault-bits)")
    if fault.profile is not None:
        state = FaultState(model, fault)
        if not state._profile:
            raise ValueError(f"none of the {state.profile_cells_outside} cells of the profile "
                             f"{fault.profile} lies in the attacked weights (bytes 0-"
                             f"{state.layout.total_bytes - 1} of the layout of docs/algorithms.md "
                             f"section 5b, {narrow.name}): the attack could flip nothing")


@dataclass
class LayerSpan:
    """Where one layer's weights lie in the memory layout."""

    name: str
    start: int            # byte offset of its first value
    numel: int
    bytes_per_value: int
    n_bits: int

    @property
    def end(self) -> int:
        return self.start + self.numel * self.bytes_per_value


class MemoryLayout:
    """Byte offsets of every attacked layer's weights (module docstring)."""

    def __init__(self, model: nn.Module):
        self.spans: dict[str, LayerSpan] = {}
        offset = 0
        for name, layer in bit_layers(model):
            fmt = layer.bit_format
            b = fmt.bytes_per_value
            offset = -(-offset // b) * b  # aligned to the value size
            self.spans[name] = LayerSpan(name, offset, layer.weight.numel(), b, fmt.n_bits)
            offset = self.spans[name].end
        self.total_bytes = offset

    def value_offset(self, name: str, index) -> int:
        s = self.spans[name]
        return s.start + index * s.bytes_per_value

    def bit_address(self, name: str, index: int, bit: int) -> tuple[int, int]:
        """``(byte offset, bit in byte with 0 = LSB)`` of bit ``bit`` (0 = MSB) of a weight."""
        s = self.spans[name]
        significance = s.n_bits - 1 - bit
        return self.value_offset(name, index) + significance // 8, significance % 8

    def page(self, name: str, index: int, page_bytes: int) -> int:
        return self.value_offset(name, index) // page_bytes


class FaultState:
    """A :class:`FaultModel` applied to one model during one attack (module docstring)."""

    def __init__(self, model: nn.Module, fault: FaultModel):
        self.fault = fault
        self.layout = MemoryLayout(model)
        self.flips_made = 0
        self._pages = {}
        self._profile = None
        self.profile_cells_outside = 0
        if fault.one_per_page:
            n_pages = -(-self.layout.total_bytes // fault.page_bytes)
            self.used_pages = torch.zeros(max(n_pages, 1), dtype=torch.bool)
        if fault.profile is not None:
            self._profile = self._profile_masks(read_profile(fault.profile))

    # -- setup ---------------------------------------------------------------------------------
    def _profile_masks(self, cells) -> dict[str, torch.Tensor]:
        """Per layer, a ``[numel, n_bits]`` uint8 mask: 1 = may flip 0 -> 1, 2 = 1 -> 0."""
        masks = {}
        spans = sorted(self.layout.spans.values(), key=lambda s: s.start)
        starts = [s.start for s in spans]
        for offset, bit_in_byte, direction in cells:
            i = bisect.bisect_right(starts, offset) - 1
            if i < 0 or offset >= spans[i].end:
                self.profile_cells_outside += 1
                continue
            s = spans[i]
            index, byte_in_value = divmod(offset - s.start, s.bytes_per_value)
            significance = byte_in_value * 8 + bit_in_byte
            if significance >= s.n_bits:  # the unused high bits of a sub-byte code
                self.profile_cells_outside += 1
                continue
            mask = masks.get(s.name)
            if mask is None:
                mask = masks[s.name] = torch.zeros(s.numel, s.n_bits, dtype=torch.uint8)
            mask[index, s.n_bits - 1 - significance] |= direction
        return masks

    def _page_index(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._pages:
            s = self.layout.spans[name]
            offsets = s.start + torch.arange(s.numel, device=device) * s.bytes_per_value
            self._pages[key] = offsets // self.fault.page_bytes
        return self._pages[key]

    # -- the search's questions ----------------------------------------------------------------
    @property
    def remaining(self) -> int | None:
        """Flips left in the budget (None: no budget)."""
        if self.fault.budget is None:
            return None
        return max(self.fault.budget - self.flips_made, 0)

    def mask(self, name: str, layer) -> torch.Tensor:
        """``[numel, n_bits]`` bool: which flips of ``layer``'s weights are admissible now."""
        fault, fmt = self.fault, layer.bit_format
        values = layer.weight.detach().reshape(-1)
        device = values.device
        allowed = torch.ones(values.numel(), fmt.n_bits, dtype=torch.bool, device=device)
        if self.remaining == 0:
            return allowed.zero_()
        if fault.bit_positions is not None:
            columns = torch.zeros(fmt.n_bits, dtype=torch.bool, device=device)
            positions = [b for b in fault.bit_positions if b < fmt.n_bits]
            columns[positions] = True
            allowed &= columns
        if fault.direction != "any" or self._profile is not None:
            bits = fmt.to_bits(values)
            if fault.direction == "0to1":
                allowed &= bits == 0
            elif fault.direction == "1to0":
                allowed &= bits == 1
            if self._profile is not None:
                cells = self._profile.get(name)
                if cells is None:
                    return allowed.zero_()
                cells = cells.to(device)
                allowed &= ((cells & 1).bool() & (bits == 0)) | ((cells & 2).bool() & (bits == 1))
        if fault.one_per_page:
            used = self.used_pages.to(device)[self._page_index(name, device)]
            allowed &= ~used.unsqueeze(1)
        return allowed

    def pages_of(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """Memory page of each weight at flat ``indices`` of layer ``name``."""
        return self._page_index(name, indices.device)[indices]

    def record(self, flips: list[Flip]) -> None:
        """The flips the attack kept: the budget is spent and their pages are used."""
        self.flips_made += len(flips)
        if self.fault.one_per_page:
            for f in flips:
                self.used_pages[self.layout.page(f.layer, f.index, self.fault.page_bytes)] = True

    # -- checking a finished attack ------------------------------------------------------------
    def violations(self, model: nn.Module, clean: dict[str, torch.Tensor]) -> list[str]:
        """Every way the model's weights break the fault model, compared bit by bit with the
        clean weights ``clean`` (a :func:`models.bits.snapshot`); empty when all is well."""
        fault, out, pages = self.fault, [], {}
        total = 0
        for name, layer in bit_layers(model):
            fmt = layer.bit_format
            now = fmt.to_bits(layer.weight.detach().reshape(-1).cpu())
            then = fmt.to_bits(clean[name].reshape(-1).cpu())
            changed = (now != then).nonzero().tolist()
            total += len(changed)
            for index, bit in changed:
                where = f"{name}[{index}] bit {bit}"
                if fault.bit_positions is not None and bit not in fault.bit_positions:
                    out.append(f"{where}: bit position not allowed")
                rose = int(now[index, bit]) == 1
                if fault.direction == "0to1" and not rose:
                    out.append(f"{where}: flipped 1 -> 0 under 0to1")
                if fault.direction == "1to0" and rose:
                    out.append(f"{where}: flipped 0 -> 1 under 1to0")
                if self._profile is not None:
                    cells = self._profile.get(name)
                    code = 0 if cells is None else int(cells[index, bit])
                    if not code & (1 if rose else 2):
                        out.append(f"{where}: not a vulnerable cell in that direction")
                if fault.one_per_page:
                    page = self.layout.page(name, index, fault.page_bytes)
                    if page in pages:
                        out.append(f"{where}: second flip in page {page} (first: {pages[page]})")
                    pages.setdefault(page, where)
        if fault.budget is not None and total > fault.budget:
            out.append(f"{total} bits changed, more than the budget of {fault.budget}")
        return out
