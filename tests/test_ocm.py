"""OCM (docs/algorithms.md section 3): codebook test vector, distances, loss and decoding rule."""

import itertools

import numpy as np
import pytest
import torch

from models.ocm import (OutputCodeMatching, SoftmaxOutput, check_code_length, hadamard,
                        make_codebook)

TEST_VECTOR = """
+ + + + - - - - + + + + - - - -
+ + + + + + + + - - - - - - - -
+ - - + - + + - + - - + - + + -
+ - - + + - - + + - - + + - - +
+ - - + + - - + - + + - - + + -
+ - + - - + - + + - + - - + - +
+ + - - + + - - + + - - + + - -
+ + - - - - + + - - + + + + - -
+ - + - + - + - + - + - + - + -
+ - - + - + + - - + + - + - - +
"""


def test_legacy_codebook_test_vector():
    expected = [[1.0 if c == "+" else -1.0 for c in line.split()]
                for line in TEST_VECTOR.strip().splitlines()]
    assert make_codebook(10, 16, seed=1).tolist() == expected


def test_legacy_shuffle_restores_numpy_state():
    np.random.seed(123)
    a = np.random.rand()
    np.random.seed(123)
    make_codebook(10, 16)
    assert np.random.rand() == a


def test_hadamard_orthogonal():
    for order in (2, 4, 16, 64):
        h = hadamard(order)
        assert np.array_equal(h @ h.T, order * np.eye(order))


@pytest.mark.parametrize("classes,length", [(10, 16), (10, 64), (100, 128), (50, 1024)])
def test_pairwise_hamming_distance_is_half_length(classes, length):
    cb = make_codebook(classes, length, seed=3)
    assert cb.shape == (classes, length)
    assert not (cb == 1).all(dim=1).any()  # the all-ones row is dropped
    diff = (cb.unsqueeze(0) != cb.unsqueeze(1)).sum(-1)
    off = diff[~torch.eye(classes, dtype=torch.bool)]
    assert (off == length // 2).all()


@pytest.mark.parametrize("length,classes", [(12, 10), (10, 10), (0, 2)])
def test_bad_code_lengths(length, classes):
    with pytest.raises(ValueError):
        check_code_length(length, classes)


def test_code_length_must_exceed_classes():
    check_code_length(16, 15)
    with pytest.raises(ValueError, match="at least classes"):
        check_code_length(16, 16)


def test_l1_loss_matches_torch():
    ocm = OutputCodeMatching(make_codebook(10, 16))
    out = torch.tanh(torch.randn(7, 16))
    y = torch.randint(0, 10, (7,))
    ref = torch.nn.L1Loss()(out, ocm.codebook[y])
    assert torch.allclose(ocm.loss(out, y), ref)
    assert torch.allclose(ocm.loss(out, y, reduction="none").mean(), ref)


def test_decoding_rule():
    cb = make_codebook(10, 16)
    ocm = OutputCodeMatching(cb)
    # an output equal to a code decodes to that class
    assert ocm.predict(cb).tolist() == list(range(10))
    z = 0.3 * cb[4] + 0.1 * cb[7]
    assert ocm.predict(z[None]).item() == 4
    # score definition
    expected = torch.log(torch.relu(z @ cb.t()) + 1e-6)
    assert torch.allclose(ocm.scores(z[None])[0], expected)


def test_decoding_quirk_all_correlations_nonpositive_gives_class_zero():
    cb = torch.tensor([[1.0, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]])
    ocm = OutputCodeMatching(cb)
    z = torch.tensor([[-1.0, 0.0, 0.0, 0.0]])  # correlates -1 with every code
    assert (z @ cb.t() <= 0).all()
    assert ocm.predict(z).item() == 0
    # ties between positive correlations go to the lowest index
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert ocm.predict(z).item() == 0


def test_softmax_output():
    out = SoftmaxOutput(3)
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    assert out.predict(logits).item() == 1
    assert torch.allclose(out.loss(logits, torch.tensor([1])),
                          torch.nn.functional.cross_entropy(logits, torch.tensor([1])))


def test_codebook_must_be_plus_minus_one():
    with pytest.raises(ValueError):
        OutputCodeMatching(torch.zeros(3, 4))
