"""DeepNcode and RADAR (docs/algorithms.md section 15): encoding, detection and repair against
brute force over every 4- and 8-bit value, the detection-aware attacks checked by the
defense's own check on the attacked model, overheads, and one-line errors."""

import itertools

import pytest
import torch
import torch.nn as nn

import attack_bfa
from attacks.base import Protocol, create_attack
from attacks.bfa import BFA, RandomFlips
from attacks.common import EvalSet
from attacks.deepncode_aware import DeepNcodeAware
from attacks.radar_pairs import RadarPairs
from cli.args import run
from defenses import create_defense, parse_defense
from defenses.deepncode import CODES, get_code
from defenses.deployment import DefendedModel
from defenses.radar import group_ids
from fakedata import make_cifar10
from models import QuantLinear, SoftmaxOutput, to_integer
from models.bits import bit_layers
from models.factory import ModelConfig, build_model
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.data import get_dataset_info

pytestmark = pytest.mark.usefixtures("one_thread")

def popcount(x: int) -> int:
    return bin(x).count("1")


@pytest.mark.parametrize("name", list(CODES))
def test_deepncode_code_by_brute_force(name):
    """Every value has its own codeword, the codewords are ``d`` apart, exactly they are
    valid, every flip of up to ``d - 1`` bits of a codeword is detected, every word reads as a
    nearest codeword's value, and a move's cost is the codewords' Hamming distance."""
    code = get_code(name)
    half = 2 ** (code.value_bits - 1)
    values = list(range(-half, half))
    words = [int(w) for w in code.encode(torch.tensor(values))]
    assert len(set(words)) == len(values) and all(0 <= w < 2 ** code.n for w in words)
    assert min(popcount(a ^ b) for a, b in itertools.combinations(words, 2)) == code.distance
    valid = set(words)
    assert [bool(v) for v in code.valid_table] == [w in valid for w in range(2 ** code.n)]
    for w in words:
        for k in range(1, code.distance):
            for bits in itertools.combinations(range(code.n), k):
                assert not code.valid_table[w ^ sum(1 << b for b in bits)]
    decoded = code.decode(torch.arange(2 ** code.n)).tolist()
    for word, value in enumerate(decoded):
        assert popcount(word ^ words[value + half]) == min(popcount(word ^ c) for c in words)
    z, y = torch.meshgrid(torch.tensor(values), torch.tensor(values), indexing="ij")
    cost = code.cost(z, y)
    assert cost.tolist() == [[popcount(words[a + half] ^ words[b + half]) for b in values]
                             for a in values]
    # the paper's margin: values one bit apart are at least 4 (4-bit) / 9 (8-bit) bits apart
    one_bit = [int(cost[a, a ^ (1 << k)]) for a in range(2 * half) for k in range(code.value_bits)]
    assert min(one_bit) >= (4 if code.value_bits == 4 else 9)


def layer_of_every_value(n_bits: int, repeats: int = 2) -> nn.Sequential:
    """A model whose one layer holds every N-bit code (``repeats`` times), in integer mode."""
    half = 2 ** (n_bits - 1)
    codes = torch.arange(-half, half).repeat(repeats)
    layer = QuantLinear(len(codes), 1, bias=False, n_bits=n_bits)
    model = to_integer(nn.Sequential(layer))
    layer.weight.data.copy_(codes.view(1, -1).float())
    return model


@pytest.mark.parametrize("n_bits,code", [(4, "C7_3"), (4, "C8_4"), (4, "C9_4"), (8, "C12_3"),
                                         (8, "C13_4"), (8, "C14_4")])
@pytest.mark.parametrize("repair", ["zero", "correct"])
def test_deepncode_detects_and_repairs_every_single_flip(n_bits, code, repair):
    model = layer_of_every_value(n_bits, 1)
    (name, layer), = bit_layers(model)
    clean = layer.int_weight().clone()
    defense = create_defense("deepncode", code=code, repair=repair)
    defense.protect(model)
    assert layer.bit_format.n_bits == get_code(code).n
    assert torch.equal(layer.int_weight(), clean)  # the forward reads the same codes
    assert defense.check_and_repair(model) == 0
    stored = layer.weight.detach().clone()
    for k in range(layer.bit_format.n_bits):  # bit k of every word at once
        layer.flip_bit(torch.arange(len(clean.view(-1))), k)
        assert defense.check_and_repair(model) == clean.numel()
        expect = torch.zeros_like(clean) if repair == "zero" else clean
        assert torch.equal(layer.int_weight(), expect)
        layer.weight.data.copy_(stored)
    assert defense.memory_per_weight(model) == (get_code(code).n, n_bits)


def signature_by_hand(values: list[int], n_bits: int) -> int:
    return (sum(values) // 2 ** (n_bits - 1)) % 4


@pytest.mark.parametrize("n_bits", [4, 8])
@pytest.mark.parametrize("key", [None, 5])
def test_radar_detects_by_its_signature_and_zeroes_the_group(n_bits, key):
    """Every single flip of every code (one code per group at a time): flagged exactly when
    bits N-1 and N of its group's sum change (computed by hand), and then the whole group,
    only it, is zeroed."""
    model = layer_of_every_value(n_bits, 3 if n_bits == 4 else 1)
    (name, layer), = bit_layers(model)
    defense = create_defense("radar", group_size=16, key=key)
    groups = group_ids(layer.weight.numel(), 16, key, 0)
    defense.protect(model)
    assert torch.equal(defense.groups_of(model)[name], groups)
    assert torch.bincount(groups).tolist() == [16] * (layer.weight.numel() // 16)
    members = [(groups == g).nonzero().view(-1).tolist() for g in range(int(groups.max()) + 1)]
    clean = layer.int_weight().view(-1).tolist()
    detected = {}
    for r, bit in itertools.product(range(16), range(n_bits)):
        defense.protect(model)
        layer.flip_bit(torch.tensor([m[r] for m in members]), bit)
        after = layer.int_weight().view(-1).tolist()
        hit = [signature_by_hand([after[i] for i in m], n_bits)
               != signature_by_hand([clean[i] for i in m], n_bits) for m in members]
        assert defense.check_and_repair(model) == sum(hit)
        zeroed = {i for m, h in zip(members, hit) if h for i in m}
        assert layer.int_weight().view(-1).tolist() == [0 if i in zeroed else v
                                                        for i, v in enumerate(after)]
        assert defense.check_and_repair(model) == 0  # a repaired group stays quiet
        detected[bit] = detected.get(bit, 0) + sum(hit)
        layer.weight.data.view(-1).copy_(torch.tensor(clean, dtype=torch.float32))
    assert detected[0] == len(clean)  # every MSB flip
    assert detected[n_bits - 1] < len(clean)  # an LSB flip only when it carries over
    stored, bits = defense.memory_per_weight(model)
    assert bits == n_bits and stored == pytest.approx(n_bits + 2 / 16)


@pytest.mark.parametrize("key", [None, 5])
def test_radar_after_a_repair_the_clean_codes_are_clean_again(key):
    """An attack resets the model to its clean codes between items: the defense must then see
    a clean model (no memory of the groups it zeroed), or an item's numbers depend on the
    items the process ran before it."""
    model = layer_of_every_value(8, 1)
    (_, layer), = bit_layers(model)
    defense = create_defense("radar", group_size=16, key=key)
    defense.protect(model)
    clean = layer.weight.detach().clone()
    for index in (0, 17, 40):
        layer.flip_bit(index, 0)  # an MSB: always seen
        assert defense.check_and_repair(model) == 1
        assert defense.check_and_repair(model) == 0  # repaired, quiet
        layer.weight.data.copy_(clean)
        assert defense.check_and_repair(model) == 0
        assert torch.equal(layer.weight, clean)


def tiny_model(n_bits=8, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), QuantLinear(3 * 8 * 8, 32, n_bits=n_bits), nn.ReLU(),
                          QuantLinear(32, 10, n_bits=n_bits))
    return to_integer(model.eval()), SoftmaxOutput(10)


@pytest.fixture(scope="module")
def tiny_data():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8, generator=gen)
    model, output = tiny_model()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    labels = EvalSet(images, torch.zeros(96), mean, std, "cpu").predict(model, output)
    return images[:32], EvalSet(images[32:], labels[32:], mean, std, "cpu")


def defended(spec):
    model, output = tiny_model()
    defense = parse_defense(spec)
    defense.protect(model)
    return model, output, defense, DefendedModel(model, model, [defense])


def group_sums(model, groups):
    return {name: torch.zeros(int(groups[name].max()) + 1, dtype=torch.int64).index_add_(
        0, groups[name], layer.int_weight().view(-1)) for name, layer in bit_layers(model)}


def test_radar_pairs_with_the_key_are_never_detected(tiny_data):
    x, data = tiny_data
    model, output, radar, evaluated = defended("radar:group_size=32,key=7")
    groups = radar.groups_of(model)
    before = group_sums(model, groups)
    attack = RadarPairs(model, output, radar, knows_key=True, eval_model=evaluated)
    result = attack.run(x, data, n_iter=3)
    assert result.bits_flipped >= 6 and result.bits_flipped % 2 == 0
    assert evaluated.detections == 0 and radar.check_and_repair(model) == 0
    assert all(torch.equal(before[n], s) for n, s in group_sums(model, groups).items())
    # without the key the pairs fall in other groups: the check zeroes them
    model, output, radar, evaluated = defended("radar:group_size=32,key=7")
    attack = RadarPairs(model, output, radar, knows_key=False, eval_model=evaluated)
    result = attack.run(x, data, n_iter=3)
    assert result.bits_flipped >= 6 and evaluated.detections > 0
    assert radar.check_and_repair(model) == 0  # every detected group was already repaired


def test_plain_bfa_on_radar_is_detected_and_zeroed(tiny_data):
    x, data = tiny_data
    model, output, radar, evaluated = defended("radar:group_size=32,key=7")
    result = BFA(model, output, eval_model=evaluated).run(x, data, n_iter=2)
    assert evaluated.detections >= 1 and result.bits_changed > result.bits_flipped


def test_deepncode_aware_moves_between_codewords_and_counts_their_bits(tiny_data):
    x, data = tiny_data
    model, output, dnc, evaluated = defended("deepncode")
    clean_codes = [layer.int_weight().clone() for _, layer in bit_layers(model)]
    attack = DeepNcodeAware(model, output, eval_model=evaluated)
    result = attack.run(x, data, n_iter=3)
    assert evaluated.detections == 0 and dnc.check_and_repair(model) == 0
    code = get_code("C14_4")
    cost = sum(int(code.cost(c, layer.int_weight()).sum())
               for c, (_, layer) in zip(clean_codes, bit_layers(model)))
    assert result.bits_changed == cost == result.bits_flipped  # each flip a distinct bit here
    assert result.bits_flipped >= 9 * attack.weight_bits and attack.weight_bits >= 3
    for row in result.profile:  # the recorded flips rebuild the stored words
        assert popcount(row.before ^ row.after) == 1
    # the cost-aware attacker: moves of at most the code's distance (4 bits), never detected
    model, output, dnc, evaluated = defended("deepncode")
    clean_codes = [layer.int_weight().clone() for _, layer in bit_layers(model)]
    attack = DeepNcodeAware(model, output, max_cost=4, eval_model=evaluated)
    result = attack.run(x, data, n_iter=3)
    assert evaluated.detections == 0 and dnc.check_and_repair(model) == 0
    costs = torch.cat([code.cost(c, layer.int_weight()).view(-1)
                       for c, (_, layer) in zip(clean_codes, bit_layers(model))])
    assert result.bits_flipped == int(costs.sum()) and result.bits_flipped >= 4
    assert set(costs[costs > 0].tolist()) <= {4}
    with pytest.raises(ValueError, match="max_cost must be a positive integer"):
        DeepNcodeAware(model, output, max_cost=0)
    # random flips of stored words are detected, one word each
    model, output, dnc, evaluated = defended("deepncode:repair=correct")
    result = RandomFlips(model, output, seed=1, eval_model=evaluated).run(x, data, n_iter=3)
    assert evaluated.detections == 3 and result.final_accuracy == result.clean_accuracy


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar24")
    make_cifar10(root)
    torch.manual_seed(0)
    config = ModelConfig(arch="resnet20_quan", num_classes=10, bits=8).validate()
    model, output = build_model(config)
    info = get_dataset_info("cifar10")
    path = str(root / "model_best.pth.tar")
    save_checkpoint(make_checkpoint(model, config, output, "cifar10", info.mean, info.std,
                                    epoch=1), path)
    return path, str(root)


@pytest.mark.parametrize("spec,message", [
    ("radar:group_size=0", "group_size must be at least 1"),
    ("radar:group_size=1.5", "group_size must be a finite integer"),
    ("radar:key_file=/nowhere/key", "is not a file"),
    ("radar:key=1,key_file=KEYFILE", "not both"),
    ("radar:key_file=BADKEY", "must hold one integer"),
    ("deepncode:code=C99_9", "code must be auto or one of"),
    ("deepncode:repair=retry", "repair must be one of"),
    ("deepncode:code=C7_3", "does not encode 8-bit weights"),
])
def test_bad_parameters_are_one_line_errors(checkpoint_and_data, tmp_path, capsys, spec,
                                            message):
    path, data_dir = checkpoint_and_data
    (tmp_path / "key").write_text("12\n")
    (tmp_path / "bad").write_text("twelve\n")
    spec = spec.replace("KEYFILE", str(tmp_path / "key")).replace("BADKEY",
                                                                   str(tmp_path / "bad"))
    argv = ["--checkpoint", path, "--data_dir", data_dir, "--n_iter", "1", "--no-progress",
            "--device", "cpu", "--results", str(tmp_path / "r"), "--defense", spec]
    assert run(attack_bfa.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err


def test_key_file_gives_the_key(tmp_path):
    (tmp_path / "key").write_text("7\n")
    with_file = create_defense("radar", group_size=32, key_file=str(tmp_path / "key"))
    model, _ = tiny_model()
    assert all(torch.equal(a, b) for a, b in zip(
        with_file.groups_of(model).values(),
        create_defense("radar", group_size=32, key=7).groups_of(model).values()))


def test_aware_attacks_from_a_target(checkpoint_and_data, tmp_path):
    """Built by name on a target with its defense, planned under the protocol; the record
    lists every stored flip."""
    from attacks.target import DataSpec, TargetSpec, build_target

    path, data_dir = checkpoint_and_data
    protocol = Protocol(bfa_reps=1, bfa_batch=8, bfa_iters=1, break_acc=-1.0)
    for spec, attack in (("radar:group_size=64,key=3", "radar_pairs:knows_key=true"),
                         ("deepncode:code=C12_3", "deepncode_aware")):
        target = build_target(TargetSpec(checkpoint=path, data=DataSpec(data_dir),
                                         defenses=(spec,)), "cpu")
        images, labels = target.load_test_split()
        data = EvalSet(images[:20], labels[:20], target.mean, target.std, "cpu")
        a = create_attack(attack, target, data, protocol)
        (item,) = a.plan(protocol)
        record = a.run_item(item)
        assert len(a.recorded_flips(record)) == record["bits_flipped"] >= 1
        assert target.eval_model.detections == 0
        assert target.defenses[-1].check_and_repair(target.model) == 0
    with pytest.raises(ValueError, match="needs a model defended by radar"):
        create_attack("radar_pairs", target, data, protocol)


@pytest.mark.parametrize("spec,extra", [("radar:group_size=64,key=1", []),
                                        ("deepncode:code=C13_4", ["--random_bfa"])])
def test_a_defended_campaign_rebuilds_with_its_repairs(checkpoint_and_data, tmp_path, spec,
                                                        extra):
    """The replay checks (and repairs) after each iteration as the attack's evaluation did, so
    the rebuilt model is the attacked one (its recorded Hamming distance, repairs included)."""
    import rebuild_attacked
    from campaigns.attacked import rebuild_attacked as rebuild

    path, data_dir = checkpoint_and_data
    results = tmp_path / "r"
    argv = ["--checkpoint", path, "--data_dir", data_dir, "--n_iter", "2", "--break_acc", "-1",
            "--no-progress", "--device", "cpu", "--attack_sample_size", "8", "--results",
            str(results), "--defense", spec, *extra]
    assert run(attack_bfa.main, argv) == 0
    target, record = rebuild(str(results), "r0")
    assert record["detections"] >= 1
    assert run(rebuild_attacked.main, ["--results", str(results), "--key", "r0", "--out",
                                       str(tmp_path / "a.pth.tar")]) == 0


def test_bench_deployment_runs(capsys):
    from bench import bench_deployment

    assert bench_deployment.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "deepncode:code=C14_4" in out and "1.750x" in out and "1.00x" in out


def test_layers_a_defense_cannot_protect_are_refused():
    binary, _ = tiny_model(n_bits=1)
    with pytest.raises(ValueError, match="does not encode 1-bit weights"):
        create_defense("deepncode").protect(binary)
    with pytest.raises(ValueError, match="N >= 2"):
        create_defense("radar").protect(binary)
    four, _ = tiny_model(n_bits=4)
    with pytest.raises(ValueError, match="codes for them: C7_3, C8_4, C9_4"):
        create_defense("deepncode", code="C12_3").protect(four)
    create_defense("deepncode").protect(four)  # auto: C9_4
    assert {layer.bit_format.name for _, layer in bit_layers(four)} == {"deepncode-C9_4"}


@pytest.mark.parametrize("max_cost", [None, 4])
def test_deepncode_aware_on_4_bit_weights(tiny_data, max_cost):
    x, data = tiny_data
    model, output = tiny_model(n_bits=4)
    dnc = parse_defense("deepncode")  # C9_4
    dnc.protect(model)
    evaluated = DefendedModel(model, model, [dnc])
    clean_codes = [layer.int_weight().clone() for _, layer in bit_layers(model)]
    result = DeepNcodeAware(model, output, max_cost=max_cost, eval_model=evaluated).run(
        x, data, n_iter=2)
    assert evaluated.detections == 0 and dnc.check_and_repair(model) == 0
    costs = torch.cat([get_code("C9_4").cost(c, layer.int_weight()).view(-1)
                       for c, (_, layer) in zip(clean_codes, bit_layers(model))])
    assert result.bits_flipped == int(costs.sum()) > 0
    moved = set(costs[costs > 0].tolist())
    assert moved == {4} if max_cost else min(moved) >= 5  # a one-bit change: 5 or 8 bits
