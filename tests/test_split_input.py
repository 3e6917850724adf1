"""Split learning refuses bad input where it enters, with an error that names the problem."""
import types

import numpy as np
import pytest
import torch
from torch import nn

from toolkit import data, models
from toolkit.split import SplitConfig, SplitNN

FAST = SplitConfig(lr=0.5, batch_size=32)


def mlp4():
    torch.manual_seed(0)
    return models.mlp([64, 128, 64, 10])


def holder(x, y, x_test=None, y_test=None):
    """A dataset-like object that skips Dataset's own checks, as user code might pass."""
    return types.SimpleNamespace(x_train=x, y_train=y, x_test=x if x_test is None else x_test,
                                 y_test=y if y_test is None else y_test)


def vanilla(ds, **kwargs):
    return SplitNN.vanilla(models.mlp([64, 32]), nn.Linear(32, 10), ds, **kwargs)


def test_parts_that_do_not_chain_are_refused_at_construction(digits):
    client = models.mlp([64, 32])
    with pytest.raises(ValueError, match=r"server's part.*Linear\(in_features=40.*\(32,\)"):
        SplitNN.vanilla(client, nn.Linear(40, 10), digits)


def test_too_few_outputs_for_the_classes(digits):
    with pytest.raises(ValueError, match="outputs 5 values per sample but its labels have 10 classes"):
        SplitNN.vanilla(models.mlp([64, 32]), nn.Linear(32, 5), digits)


def test_labels_of_the_wrong_length(digits):
    bad = holder(digits.x_train, digits.y_train[:-3], digits.x_test, digits.y_test)
    with pytest.raises(ValueError, match=r"1437 samples but client's labels y has 1434.*wrong label length"):
        vanilla(bad)


@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (float("inf"), "Inf"), (-float("inf"), "Inf")])
def test_non_finite_inputs_are_named_with_their_first_index(digits, value, what):
    x = digits.x_train.clone()
    x[17, 0, 3, 4] = value
    x[200, 0, 0, 0] = value
    with pytest.raises(ValueError, match=rf"client's x holds {what} at index \(17, 0, 3, 4\)"):
        vanilla(holder(x, digits.y_train, digits.x_test, digits.y_test))
    x_test = digits.x_test.clone()
    x_test[5, 0, 1, 1] = value
    with pytest.raises(ValueError, match=rf"client's x_test holds {what} at index \(5, 0, 1, 1\)"):
        vanilla(holder(digits.x_train, digits.y_train, x_test, digits.y_test))


def test_float_and_negative_labels_are_refused(digits):
    with pytest.raises(ValueError, match=r"client's labels y must be integer class indices.*float32"):
        vanilla(holder(digits.x_train, digits.y_train.float(), digits.x_test, digits.y_test))
    y = digits.y_train.clone()
    y[9] = -1
    with pytest.raises(ValueError, match=r"client's labels y holds a negative label -1 at index 9"):
        vanilla(holder(digits.x_train, y, digits.x_test, digits.y_test))
    with pytest.raises(ValueError, match=r"server's labels y must be integer class indices"):
        vanilla(holder(digits.x_train, digits.y_train.float(), digits.x_test, digits.y_test), labels="server")


def test_numpy_arrays_are_refused_with_a_hint(digits):
    with pytest.raises(TypeError, match=r"client's x must be a torch.Tensor, got numpy.ndarray.*torch.as_tensor"):
        vanilla(holder(digits.x_train.numpy(), digits.y_train, digits.x_test, digits.y_test))
    with pytest.raises(TypeError, match=r"client's labels y must be a torch.Tensor, got numpy.ndarray"):
        vanilla(holder(digits.x_train, np.asarray(digits.y_train), digits.x_test, digits.y_test))


def test_an_empty_training_set_is_refused(digits):
    empty = holder(digits.x_train[:0], digits.y_train[:0], digits.x_test, digits.y_test)
    with pytest.raises(ValueError, match=r"the training set is empty"):
        vanilla(empty)


def test_vertical_client_missing_samples(digits):
    left, right = data.vertical_split(digits, 2)
    short = right.subset(torch.arange(1000))
    with pytest.raises(ValueError, match="client:1 holds 1000 train samples but client:0 holds 1437"):
        SplitNN.vertical([models.mlp([32, 8]), models.mlp([32, 8])], nn.Linear(16, 10), [left, short])
    shuffled = right.subset(torch.randperm(len(right.y_train), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="not aligned"):
        SplitNN.vertical([models.mlp([32, 8]), models.mlp([32, 8])], nn.Linear(16, 10), [left, shuffled])


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"batch_size": 2.5}, "batch_size must be a positive int, got 2.5"),
    ({"batch_size": True}, "batch_size must be a positive int, got True"),
    ({"eval_batch_size": -4}, "eval_batch_size must be a positive int"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"momentum": -0.5}, r"momentum must be a number in \[0.0, 1.0\), got -0.5"),
    ({"momentum": 1.0}, r"momentum must be a number in \[0.0, 1.0\)"),
    ({"seed": -1}, "seed must be a non-negative int"),
    ({"shuffle": "yes"}, "shuffle must be True or False"),
    ({"optimizer": "rmsprop"}, "unknown optimizer"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SplitConfig(**kwargs)


def test_bad_configuration_arguments(digits):
    parts = models.cut(mlp4(), at=(1, 3))
    with pytest.raises(ValueError, match="at least three segments"):
        SplitNN.multi_hop(parts[:2], digits)
    with pytest.raises(ValueError, match="distinct party name"):
        SplitNN.multi_hop(parts, digits, names=["a", "b", "a"])
    with pytest.raises(ValueError, match="unknown merge"):
        SplitNN.vertical([models.mlp([32, 8])] * 2, nn.Linear(16, 10), data.vertical_split(digits, 2), merge="max")
    with pytest.raises(ValueError, match="label_holder"):
        SplitNN.vertical([models.mlp([32, 8])] * 2, nn.Linear(16, 10), data.vertical_split(digits, 2),
                         label_holder="bank")
    sl = vanilla(digits, config=FAST)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="epochs must be a positive int"):
            sl.fit(epochs=bad)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        sl.fit(steps=0)
    with pytest.raises(TypeError, match="config must be a SplitConfig"):
        vanilla(digits, config={"lr": 0.1})
