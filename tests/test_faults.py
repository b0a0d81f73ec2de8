"""Fault models (utils/faults.py, docs/algorithms.md section 5b): the candidate under each
constraint equals a brute-force search over the admissible flips written here with Python
integers, and constrained attacks never make an inadmissible flip (checked bit by bit on the
final weights against the clean ones, by a checker independent of utils/faults.py)."""

import json
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks.bfa import BFA, RandomFlips
from attacks.common import EvalSet
from attacks.tbfa import TBFA, TBFAConfig, draw_sets
from models import QuantLinear, to_integer
from models.bits import FloatFormat, StoredWeights, bit_layers, snapshot
from models.factory import ModelConfig, build_model
from utils.bitsearch import MAXIMIZE, MINIMIZE, layer_candidate
from utils.data import get_dataset_info
from utils.faults import (FaultModel, FaultState, MemoryLayout, check_applies,
                          parse_bit_positions, read_profile)


pytestmark = pytest.mark.usefixtures("one_thread")


class HalfLinear(nn.Linear, StoredWeights):
    """A float16-weight linear layer written here (the test's own, not models/formats.py)."""

    bit_format = FloatFormat("fp16")

    def __init__(self, i, o):
        super().__init__(i, o)
        self.weight = nn.Parameter(self.weight.detach().to(torch.float16))

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias)


def toy_model(seed=0):
    """int8, fp16 and int4 layers, sizes that span several 256-byte pages and misalign."""
    torch.manual_seed(seed)
    model = nn.Sequential(QuantLinear(30, 41, n_bits=8), nn.ReLU(), HalfLinear(41, 33),
                          nn.ReLU(), QuantLinear(33, 10, n_bits=4))
    for m in model:
        if isinstance(m, QuantLinear):
            m.to_integer()
    for _, layer in bit_layers(model):
        layer.weight.grad = torch.randn(layer.weight.shape, dtype=torch.float32).to(
            layer.weight.dtype)
    return model


# -- independent scalar view of the bits ------------------------------------------------------

def nbytes(n_bits):
    return (n_bits + 7) // 8


def pattern_of(layer, value):
    """Unsigned bit pattern of one stored value, with Python integers / struct / numpy."""
    name = layer.bit_format.name
    if name == "fp16":
        return int(np.array([value], dtype=np.float16).view(np.uint16)[0])
    if name == "fp32":
        return struct.unpack(">I", struct.pack(">f", value))[0]
    n = layer.bit_format.n_bits
    return int(round(value)) % (1 << n)


def value_of(layer, pattern):
    name = layer.bit_format.name
    if name == "fp16":
        return float(np.array([pattern], dtype=np.uint16).view(np.float16)[0])
    n = layer.bit_format.n_bits
    return float(pattern - (1 << n) if pattern >= 1 << (n - 1) else pattern)


def layout_starts(model):
    """Byte offset of each layer: back to back in model order, aligned to the value size."""
    starts, offset = {}, 0
    for name, layer in bit_layers(model):
        b = nbytes(layer.bit_format.n_bits)
        offset = (offset + b - 1) // b * b
        starts[name] = offset
        offset += layer.weight.numel() * b
    return starts, offset


def admissible(fault, layer, name, starts, index, bit, pattern, used_pages, profile, spent):
    n = layer.bit_format.n_bits
    b = nbytes(n)
    current = (pattern >> (n - 1 - bit)) & 1
    if fault.budget is not None and spent >= fault.budget:
        return False
    if fault.bit_positions is not None and bit not in fault.bit_positions:
        return False
    if fault.direction == "0to1" and current != 0:
        return False
    if fault.direction == "1to0" and current != 1:
        return False
    if profile is not None:
        significance = n - 1 - bit
        cell = (starts[name] + index * b + significance // 8, significance % 8)
        if profile.get(cell, 0) & (1 if current == 0 else 2) == 0:
            return False
    if fault.one_per_page and (starts[name] + index * b) // fault.page_bytes in used_pages:
        return False
    return True


def brute_force(model, name, fault, direction, used_pages=(), profile=None, spent=0):
    """``(score, index, bit)`` of every admissible flip of layer ``name``, in flat order."""
    layer = dict(bit_layers(model))[name]
    starts, _ = layout_starts(model)
    values = layer.weight.detach().reshape(-1).float().tolist()
    grads = layer.weight.grad.reshape(-1).float()
    out = []
    for i, v in enumerate(values):
        p = pattern_of(layer, v)
        for k in range(layer.bit_format.n_bits):
            if not admissible(fault, layer, name, starts, i, k, p, used_pages, profile, spent):
                continue
            flipped = value_of(layer, p ^ (1 << (layer.bit_format.n_bits - 1 - k)))
            if layer.bit_format.name == "fp16":  # the search scores floats in float64
                score = direction * (flipped - v) * float(grads[i])
            else:  # integer codes in the gradient's dtype (float32)
                score = float(np.float32(direction * (flipped - v)) * np.float32(grads[i]))
            if score != score:
                continue
            out.append((score, i, k))
    return out


def write_profile(path, model, n_cells=900, seed=3):
    """A random profile over the layout, plus a header, comments and a cell outside it."""
    _, total = layout_starts(model)
    rng = np.random.default_rng(seed)
    cells = {}
    lines = ["# offset,bit,direction", "# templated cells"]
    for _ in range(n_cells):
        offset, bit = int(rng.integers(total)), int(rng.integers(8))
        d = int(rng.integers(1, 3))
        cells[(offset, bit)] = cells.get((offset, bit), 0) | d
        lines.append(f"{hex(offset) if offset % 2 else offset} {bit} "
                     f"{'0to1' if d == 1 else '1to0'}")
    lines.append(f"{total + 10} 0 0to1  # beyond the weights: ignored")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return cells


FAULTS = {
    "msb only": FaultModel(bit_positions=(0,)),
    "no msb": FaultModel(bit_positions=tuple(range(1, 16))),
    "0to1": FaultModel(direction="0to1"),
    "1to0": FaultModel(direction="1to0"),
    "page": FaultModel(one_per_page=True, page_bytes=256),
    "budget": FaultModel(budget=2),
    "mixed": FaultModel(bit_positions=(1, 2, 3, 4), direction="0to1", one_per_page=True,
                        page_bytes=128),
}


@pytest.mark.parametrize("direction", [MAXIMIZE, MINIMIZE])
@pytest.mark.parametrize("case", list(FAULTS) + ["profile"])
def test_candidate_is_the_brute_force_best_admissible_flip(case, direction, tmp_path):
    model = toy_model(seed=len(case))
    profile = None
    if case == "profile":
        profile = write_profile(tmp_path / "cells.txt", model)
        fault = FaultModel(profile=str(tmp_path / "cells.txt"))
    else:
        fault = FAULTS[case]
    state = FaultState(model, fault)
    used = set()
    if fault.one_per_page:  # some pages already hold a flip
        for page in (0, 3, 4, 9):
            state.used_pages[page] = True
            used.add(page)
    if fault.budget:
        state.flips_made = 1
    for name, layer in bit_layers(model):
        options = brute_force(model, name, fault, direction, used, profile, state.flips_made)
        cand = layer_candidate(name, layer, direction, 1, None, state)
        if not options:
            assert cand is None
            continue
        score, index, bit = max(options, key=lambda o: o[0])  # first of equal maxima
        assert (int(cand.indices[0]), int(cand.bits[0])) == (index, bit), name
        assert bool(cand.admissible) == (score > 0)


def test_budget_spent_means_no_candidate():
    model = toy_model()
    state = FaultState(model, FaultModel(budget=3))
    state.flips_made = 3
    for name, layer in bit_layers(model):
        assert layer_candidate(name, layer, MAXIMIZE, 1, None, state) is None


@pytest.mark.parametrize("k", [2, 5])
def test_multi_bit_candidate_takes_the_best_flip_of_the_best_pages(k):
    model = toy_model(seed=7)
    fault = FaultModel(one_per_page=True, page_bytes=64)
    state = FaultState(model, fault)
    starts, _ = layout_starts(model)
    for name, layer in bit_layers(model):
        b = nbytes(layer.bit_format.n_bits)
        best_of_page = {}
        for score, i, bit in brute_force(model, name, fault, MAXIMIZE):
            page = (starts[name] + i * b) // 64
            if score > 0 and (page not in best_of_page or score > best_of_page[page][0]):
                best_of_page[page] = (score, i, bit)
        expected = sorted(best_of_page.values(), key=lambda o: -o[0])[:k]
        cand = layer_candidate(name, layer, MAXIMIZE, k, None, state)
        got = sorted(zip(cand.indices.tolist(), cand.bits.tolist()))
        assert got == sorted((i, bit) for _, i, bit in expected), name
        pages = [(starts[name] + i * b) // 64 for i, _ in got]
        assert len(set(pages)) == len(pages)


def test_k_top_pool_under_a_fault_model():
    model = toy_model(seed=2)
    fault = FaultModel(direction="1to0")
    state = FaultState(model, fault)
    for name, layer in bit_layers(model):
        g = layer.weight.grad.reshape(-1).float().abs()
        pool = set(g.topk(5).indices.tolist())
        options = [o for o in brute_force(model, name, fault, MAXIMIZE) if o[1] in pool]
        cand = layer_candidate(name, layer, MAXIMIZE, 1, 5, state)
        score, index, bit = max(options, key=lambda o: o[0])
        assert (int(cand.indices[0]), int(cand.bits[0])) == (index, bit)


def test_memory_layout_offsets_and_bit_addresses():
    model = toy_model()
    layout = MemoryLayout(model)
    starts, total = layout_starts(model)
    assert {n: s.start for n, s in layout.spans.items()} == starts
    assert layout.total_bytes == total
    # int8 layer 0: 1230 bytes; the fp16 layer starts aligned to 2 bytes
    assert starts["2"] == 1230 and starts["4"] == 1230 + 41 * 33 * 2
    assert layout.bit_address("2", 5, 0) == (1230 + 10 + 1, 7)   # MSB: high byte, bit 7
    assert layout.bit_address("2", 5, 15) == (1230 + 10, 0)      # LSB: low byte, bit 0
    assert layout.bit_address("4", 0, 0) == (starts["4"], 3)     # int4 MSB in the low nibble


def test_parsing_and_validation(tmp_path):
    assert parse_bit_positions("0") == (0,)
    assert parse_bit_positions("1-3,0,6") == (0, 1, 2, 3, 6)
    for bad in ("", "a", "3-1", "1,,2"):
        with pytest.raises(ValueError):
            parse_bit_positions(bad)
    p = tmp_path / "p.csv"
    p.write_text("# offset,bit,direction\n0x10 7 1to0\n3, 0, 0->1  # comment\n\n")
    assert read_profile(str(p)) == [(16, 7, 2), (3, 0, 1)]
    for text, where in (("0 0 0to1\n5 9 0to1\n", "p.csv:2"),  # bit 9 of a byte
                        ("offset,bit,direction\n0 0 0to1\n", "p.csv:1"),  # a header, not #
                        ("0 0 0to1 extra\n", "p.csv:1"), ("# only comments\n\n", "no cells")):
        p.write_text(text)
        with pytest.raises(ValueError, match=where):
            read_profile(str(p))
    p.write_bytes(b"0 0 0to1\n\xff 1 0to1\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_profile(str(p))
    with pytest.raises(ValueError, match="beyond every number format"):
        parse_bit_positions("0-40")
    with pytest.raises(ValueError, match="power of two"):
        FaultModel(one_per_page=True, page_bytes=3000)
    with pytest.raises(ValueError):
        FaultModel(direction="up")
    with pytest.raises(ValueError):
        FaultModel(page_bytes=6)
    with pytest.raises(ValueError):
        FaultModel(budget=0)
    assert FaultModel().unconstrained and FaultModel().label() == "none"
    assert FaultModel(one_per_page=True).label() == "1/page"
    assert FaultModel(bit_positions=(0, 2, 3, 4, 7)).label() == "bits 0,2-4,7"
    assert parse_bit_positions("0,2-4,7") == (0, 2, 3, 4, 7)
    f = FaultModel(bit_positions=(3, 1), direction="0to1", budget=4)
    assert FaultModel.from_dict(json.loads(json.dumps(f.to_dict()))) == f


# -- attacks under fault models: nothing inadmissible on the final weights ---------------------

def changed_bits_by_hand(model, clean):
    """``(layer, index, bit, now)`` of every bit that differs from the clean weights."""
    out = []
    for name, layer in bit_layers(model):
        now = layer.weight.detach().reshape(-1).float().tolist()
        then = clean[name].reshape(-1).float().tolist()
        n = layer.bit_format.n_bits
        for i, (a, b) in enumerate(zip(now, then)):
            pa, pb = pattern_of(layer, a), pattern_of(layer, b)
            for k in range(n):
                mask = 1 << (n - 1 - k)
                if (pa ^ pb) & mask:
                    out.append((name, i, k, int(bool(pa & mask))))
    return out


def check_final_weights(model, clean, fault, profile=None):
    """Every changed bit is admissible under ``fault`` (independent of utils/faults.py)."""
    starts, _ = layout_starts(model)
    layers = dict(bit_layers(model))
    changed = changed_bits_by_hand(model, clean)
    pages = set()
    for name, i, k, now in changed:
        n = layers[name].bit_format.n_bits
        if fault.bit_positions is not None:
            assert k in fault.bit_positions
        if fault.direction == "0to1":
            assert now == 1
        if fault.direction == "1to0":
            assert now == 0
        if profile is not None:
            sig = n - 1 - k
            cell = (starts[name] + i * nbytes(n) + sig // 8, sig % 8)
            assert profile.get(cell, 0) & (1 if now == 1 else 2)
        if fault.one_per_page:
            page = (starts[name] + i * nbytes(n)) // fault.page_bytes
            assert page not in pages, f"two flips in page {page}"
            pages.add(page)
    if fault.budget is not None:
        assert len(changed) <= fault.budget
    return changed


def resnet(kind="vanilla", seed=0):
    torch.manual_seed(seed)
    cfg = (ModelConfig("resnet20_quan", 10) if kind == "vanilla" else
           ModelConfig("resnet20_quan", 10, output_act="tanh", ocm=True, code_length=16))
    model, output = build_model(cfg)
    return to_integer(model.eval()), output


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def eval_set(n=40, seed=2):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    info = get_dataset_info("cifar10")
    return EvalSet(images(n, seed), labels, info.mean, info.std, "cpu")


ATTACK_FAULTS = {
    "page": FaultModel(one_per_page=True),
    "0to1": FaultModel(direction="0to1"),
    "no msb + 1to0": FaultModel(bit_positions=tuple(range(1, 8)), direction="1to0"),
    "budget": FaultModel(budget=3),
}


@pytest.mark.parametrize("attack", ["bfa", "random"])
@pytest.mark.parametrize("case", list(ATTACK_FAULTS) + ["profile"])
def test_flip_attacks_make_only_admissible_flips(attack, case, tmp_path):
    model, output = resnet()
    profile = None
    if case == "profile":
        profile = write_profile(tmp_path / "cells.txt", model, n_cells=20000)
        fault = FaultModel(profile=str(tmp_path / "cells.txt"))
    else:
        fault = ATTACK_FAULTS[case]
    clean = snapshot(model)
    cls = BFA if attack == "bfa" else RandomFlips
    result = cls(model, output, fault=fault).run(images(8, 1), eval_set(), n_iter=6)
    changed = check_final_weights(model, clean, fault, profile)
    assert changed and result.fault_violations == 0
    assert result.fault_model == fault.to_dict()
    if case == "budget":
        assert result.bits_flipped == 3 and result.stopped_by == "budget"


@pytest.mark.parametrize("case", ["page", "0to1", "budget"])
def test_tbfa_makes_only_admissible_flips(case):
    model, output = resnet("ocm16", seed=1)
    data = eval_set(n=60, seed=4)
    sets = draw_sets(data.labels, 1, 4, 4, seed=0)
    fault = ATTACK_FAULTS[case]
    clean = snapshot(model)
    res = TBFA(model, output, TBFAConfig(max_iters=8, fault=fault)).run(data, sets, 1, 2)
    changed = check_final_weights(model, clean, fault)
    assert changed and res.fault_violations == 0
    if case == "budget":
        assert res.iterations == 3 and res.stop_reason == "budget"


def test_unconstrained_fault_model_changes_nothing():
    """FaultModel() is the default search: the same flips as no fault model at all."""
    runs = []
    for fault in (None, FaultModel()):
        model, output = resnet(seed=3)
        result = BFA(model, output, fault=fault).run(images(8, 1), eval_set(), n_iter=3)
        runs.append([(r.layer, r.index, r.bit) for r in result.profile])
    assert runs[0] == runs[1]


def test_fault_state_reports_violations():
    model, _ = resnet()
    clean = snapshot(model)
    layer = dict(bit_layers(model))["conv1"]
    layer.flip_bit(0, 7)  # 0 -> 1 or 1 -> 0 at the LSB of weight 0
    layer.flip_bit(1, 7)  # same page
    rose = int(layer.weight.view(-1)[0].round()) % 2 == 1
    state = FaultState(model, FaultModel(one_per_page=True, direction="1to0" if rose else "0to1",
                                         bit_positions=(0,), budget=1))
    problems = state.violations(model, clean)
    assert any("second flip in page" in p for p in problems)
    assert any("bit position not allowed" in p for p in problems)
    assert any("budget" in p for p in problems)
    assert sum("under" in p for p in problems) >= 1
    assert not FaultState(model, FaultModel()).violations(model, clean)


def test_profile_cells_outside_the_weights_are_counted(tmp_path):
    model = toy_model()
    write_profile(tmp_path / "c.txt", model, n_cells=10)
    state = FaultState(model, FaultModel(profile=str(tmp_path / "c.txt")))
    assert state.profile_cells_outside >= 1
    assert os.path.exists(tmp_path / "c.txt")
    check_applies(FaultModel(profile=str(tmp_path / "c.txt")), model)  # some cells inside


def test_a_fault_model_must_apply_to_the_attacked_format(tmp_path):
    """Bit positions outside every attacked layer's format, or a profile with no cell in the
    weights, cannot mean what they say: refused (the scripts do it before writing)."""
    model = toy_model()  # layers of 2 to 16 bits: the narrowest decides
    narrow = min(layer.bit_format.n_bits for _, layer in bit_layers(model))
    check_applies(FaultModel(bit_positions=tuple(range(narrow))), model)
    with pytest.raises(ValueError, match=f"bits 0-{narrow - 1}"):
        check_applies(FaultModel(bit_positions=(narrow,)), model)
    _, total = layout_starts(model)
    (tmp_path / "far.txt").write_text(f"{total} 0 0to1\n{total + 99} 7 1to0\n")
    with pytest.raises(ValueError, match="none of the 2 cells"):
        check_applies(FaultModel(profile=str(tmp_path / "far.txt")), model)
