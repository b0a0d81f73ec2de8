"""RADAR: checksums of interleaved weight groups, checked at run time; a group whose signature
changed is zeroed (docs/algorithms.md section 15).

Li, Rakin, He, Fan, Chakrabarti, "RADAR: Run-time Adversarial Weight Attack Detection and
Accuracy Recovery", DATE 2021 (arXiv 2101.08254).

Each quantized layer's ``n`` codes are split into ``ceil(n / group_size)`` groups, interleaved
across the layer: the code at flat position ``i`` belongs to group ``pi(i) mod n_groups``, with
``pi`` the identity (no key) or a permutation drawn from the secret ``key`` (the secret
interleaving). A group's checksum is the sum ``M`` of its N-bit two's complement codes; its
2-bit signature is bits ``N-1`` and ``N`` of ``M`` (``floor(M / 2**(N-1)) mod 4``): one flip of
a code's MSB changes ``M`` by ``2**(N-1)`` and so the signature, two same-direction MSB flips
change it by ``2**N``, which the second bit sees. :meth:`Radar.protect` keeps the golden
signatures of the clean codes (the securely stored part); :meth:`Radar.check_and_repair`
recomputes them and zeroes every group whose signature differs (its golden signature becomes
that of zeros, so a repaired group is flagged again only if it is attacked again).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from models.bits import IntFormat, bit_layers

from .base import DeploymentDefense, check_param, register_defense

SIGNATURE_BITS = 2


def read_key_file(path: str) -> int:
    """The secret interleaving key in ``path``: one integer (ValueError naming the file)."""
    if not os.path.isfile(path):
        raise ValueError(f"radar: key_file {path!r} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"radar: key_file {path!r} cannot be read ({e})") from None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"radar: key_file {path!r} must hold one integer key, got "
                         f"{text[:20]!r}") from None


def group_ids(numel: int, group_size: int, key: int | None, layer_index: int) -> torch.Tensor:
    """The group of each flat position of a layer of ``numel`` codes: ``pi(i) mod n_groups``
    (``pi`` the identity without a key, else a permutation drawn from ``key`` and the layer's
    position in the model)."""
    n_groups = -(-numel // group_size)
    positions = torch.arange(numel)
    if key is not None:
        gen = torch.Generator().manual_seed(int(key) * 1_000_003 + layer_index)
        positions = torch.randperm(numel, generator=gen)
    return positions % n_groups


def signatures(codes: torch.Tensor, groups: torch.Tensor, n_groups: int,
               n_bits: int) -> torch.Tensor:
    """The 2-bit signature of every group: bits ``N-1`` and ``N`` of its code sum."""
    sums = torch.zeros(n_groups, dtype=torch.int64, device=codes.device)
    sums.index_add_(0, groups, codes.reshape(-1).to(torch.int64))
    return (sums >> (n_bits - 1)) & (2 ** SIGNATURE_BITS - 1)


@register_defense
@dataclass
class Radar(DeploymentDefense):
    """RADAR (docs/algorithms.md section 15): ``group_size`` codes per group (512, the paper's
    ResNet-18 setting), the secret interleaving ``key`` (an integer, or ``key_file`` holding
    one; none: the plain interleaving ``i mod n_groups``)."""

    name = "radar"
    group_size: int = 512
    key: int | None = None
    key_file: str = ""

    def __post_init__(self):
        super().__post_init__()
        self._state: dict = {}  # layer name -> (groups, number of groups, golden signatures)

    def to_dict(self) -> dict:
        d = {"name": self.name, "group_size": self.group_size}
        if self.key is not None:
            d["key"] = self.key
        if self.key_file:
            d["key_file"] = self.key_file
        return d

    def label(self) -> str:
        return (f"{self.name}:group_size={self.group_size}"
                f"{f',key={self.key}' if self.key is not None else ''}"
                f"{f',key_file={self.key_file}' if self.key_file else ''}")

    def validate(self) -> None:
        check_param(self.group_size, "radar: group_size", integer=True, minimum=1)
        if self.key is not None:
            check_param(self.key, "radar: key", integer=True, minimum=0)
        if self.key_file:
            if self.key is not None:
                raise ValueError("radar: give the key or a key_file, not both")
            read_key_file(self.key_file)

    def secret(self) -> int | None:
        """The interleaving key in use (from ``key_file`` when given)."""
        return read_key_file(self.key_file) if self.key_file else self.key

    def groups_of(self, model) -> dict[str, torch.Tensor]:
        """The group of every weight of every protected layer (what an attacker who knows the
        key knows)."""
        key = self.secret()
        return {name: group_ids(layer.weight.numel(), self.group_size, key, i).to(
                    layer.weight.device)
                for i, (name, layer) in enumerate(bit_layers(model))}

    @staticmethod
    def _layers(model):
        layers = bit_layers(model)
        for name, layer in layers:
            if not isinstance(layer.bit_format, IntFormat) or layer.bit_format.n_bits < 2:
                raise ValueError(f"radar checks N-bit integer codes (N >= 2); layer {name} is "
                                 f"{layer.bit_format.name}")
        return layers

    def protect(self, model) -> None:
        """Keep the golden signature of every group of the clean codes."""
        self._state = {}
        groups = self.groups_of(model)
        for name, layer in self._layers(model):
            n_groups = int(groups[name].max()) + 1
            codes = layer.bit_format.codes(layer.weight.detach())
            self._state[name] = (groups[name], n_groups,
                                 signatures(codes, groups[name], n_groups,
                                            layer.bit_format.n_bits))

    @torch.no_grad()
    def check_and_repair(self, model) -> int:
        flagged = 0
        for name, layer in bit_layers(model):
            if name not in self._state:
                continue
            groups, n_groups, golden = self._state[name]
            fmt = layer.bit_format
            codes = fmt.codes(layer.weight.detach()).reshape(-1)
            now = signatures(codes, groups, n_groups, fmt.n_bits)
            # A repaired (all-zero) group has the signature of zeros. The golden signatures
            # never change, so that the clean codes put back (an attack's reset between
            # items) are the clean, unflagged model again.
            nonzero = torch.zeros(n_groups, dtype=torch.int64, device=codes.device)
            nonzero.index_add_(0, groups, (codes != 0).to(torch.int64))
            bad = now != golden.masked_fill(nonzero == 0, 0)
            n_bad = int(bad.sum())
            if n_bad:
                layer.weight.data.view(-1)[bad[groups]] = 0
                flagged += n_bad
        return flagged

    def memory_per_weight(self, model) -> tuple[float, float]:
        layers = self._layers(model)
        numel = sum(layer.weight.numel() for _, layer in layers)
        plain = sum(layer.weight.numel() * layer.bit_format.n_bits for _, layer in layers)
        groups = sum(-(-layer.weight.numel() // self.group_size) for _, layer in layers)
        return (plain + SIGNATURE_BITS * groups) / numel, plain / numel
