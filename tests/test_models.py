import pytest
import torch
from torch import nn

from toolkit import models


@pytest.mark.parametrize("name,kwargs,shape", [
    ("mlp", {"sizes": [64, 32, 10]}, (1, 8, 8)),
    ("tabular_mlp", {"n_features": 30, "n_classes": 2}, (30,)),
    ("lenet", {}, (1, 28, 28)),
    ("lenet", {"image_size": 32, "in_channels": 3}, (3, 32, 32)),
    ("lenet", {"variant": "dlg", "image_size": 32}, (1, 32, 32)),
    ("convnet", {}, (1, 8, 8)),
    ("convnet", {"in_channels": 3, "image_size": 32}, (3, 32, 32)),
])
def test_zoo_models_map_inputs_to_class_scores(name, kwargs, shape):
    model = models.build(name, **kwargs)
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, kwargs.get("n_classes", 2 if name == "tabular_mlp" else 10))


def test_dlg_lenet_is_the_sigmoid_variant():
    model = models.lenet(variant="dlg", image_size=32)
    assert sum(isinstance(m, nn.Sigmoid) for m in model) == 3
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in model)
    assert model.fc.in_features == 12 * 8 * 8  # 768 for 32x32, as in Zhu et al.


def test_cut_by_index_and_by_name_agree_and_share_layers():
    net = models.lenet()
    by_index = models.cut(net, at=3)
    by_name = models.cut(net, at="pool1")
    assert models.layer_names(by_index[0]) == models.layer_names(by_name[0]) == ["conv1", "act1", "pool1"]
    assert by_index[0].conv1 is net.conv1  # parts share the model's layers
    x = torch.rand(4, 1, 28, 28)
    client, server = by_index
    assert torch.equal(server(client(x)), net(x))


def test_cut_in_three_for_u_shape_and_more_for_multi_hop():
    net = models.mlp([64, 32, 16, 10])
    head, middle, tail = models.cut(net, at=("act1", 4))
    assert models.layer_names(middle) == ["fc2"] and models.layer_names(tail) == ["act2", "fc3"]
    assert len(models.cut(net, at=(1, 2, 3, 4))) == 5


@pytest.mark.parametrize("at,message", [
    (0, "out of range"), (12, "out of range"), (-1, "out of range"), ("fc3", "out of range"),
    ("conv9", "no layer named 'conv9'"), ((5, 3), "strictly increasing"), (2.5, "int or a layer name"),
])
def test_bad_cuts_name_the_problem(at, message):
    with pytest.raises(ValueError, match=message):
        models.cut(models.lenet(), at=at)


def test_cut_needs_a_sequential():
    with pytest.raises(ValueError, match="nn.Sequential"):
        models.cut(nn.Linear(3, 3), at=1)


def test_parts_that_do_not_chain_name_the_layer_and_shape():
    client = models.cut(models.lenet(), at="pool2")[0]  # outputs (16, 5, 5) = 400 features
    server = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    with pytest.raises(ValueError, match=r"part 1 layer '1'.*\(400,\)"):
        models.check_chain([client, server], (1, 28, 28))
    with pytest.raises(ValueError, match=r"part 0 layer 'conv1'"):
        models.cut(models.lenet(), at=3, input_shape=(3, 28, 28))  # wrong channel count


def test_check_chain_leaves_batchnorm_statistics_alone():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    before = net[1].running_mean.clone()
    assert models.check_chain(models.cut(net, at=2), (4,)) == [(4,), (2,)]
    assert torch.equal(net[1].running_mean, before) and net.training


def test_layer_table_lists_what_would_cross_each_cut():
    table = models.layer_table(models.lenet(), (1, 28, 28))
    row = table.set_index("name").loc["pool2"]
    assert row.output_shape == (16, 5, 5) and row.output_numel == 400 and row.cut_at == 6


def test_bad_model_options_are_refused():
    with pytest.raises(ValueError, match="16x16"):
        models.lenet(image_size=8)
    with pytest.raises(ValueError, match="unknown model"):
        models.build("resnet")
    with pytest.raises(ValueError, match="unknown activation"):
        models.mlp([3, 2], activation="gelu")
    with pytest.raises(ValueError, match="unknown lenet variant"):
        models.lenet(variant="modern")
