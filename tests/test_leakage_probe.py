"""LeakageProbe: the dcor column holds dCor(probe inputs, client part(probe inputs)) at every
``every``-th step and at each epoch's last step (NaN elsewhere), leaves training unchanged, falls
under NoPeek, combines with other hooks, and refuses bad input."""
import math

import dcor
import pytest
import torch
from torch import nn

from defenses import NoPeek
from toolkit.split import Hook, Hooks, SplitConfig, SplitNN
from toolkit.split.leakage import LeakageProbe

SGD = SplitConfig(lr=0.1, batch_size=64, record=False)
ADAM = SplitConfig(optimizer="adam", lr=3e-3, batch_size=64, record=False)


@pytest.fixture(scope="module")
def small(digits):
    return digits.subset(range(500))  # 500 training samples: 8 steps per epoch, the last of 52


def encoder(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(1), nn.Linear(64, 32), nn.Dropout(dropout), nn.Tanh())


def head(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 10))


@torch.no_grad()
def by_hand(part, x):
    """dCor at the cut, from the reference library, in eval mode."""
    part.eval()
    z = part(x)
    part.train()
    return dcor.distance_correlation(x.reshape(len(x), -1).double().numpy(), z.double().numpy())


def test_the_recorded_value_is_the_distance_correlation_at_that_step(small):
    client, probes = encoder(dropout=0.3), small.x_test[:60]
    probe = LeakageProbe(probes, client, every=2)
    sl = SplitNN.vanilla(client, head(), small, config=SGD, hooks={"client": probe})
    for _ in range(2):  # the value at step 2, then at step 4: the client part as it is then
        history = sl.fit(steps=2)
        assert math.isnan(history["dcor"].iloc[0])
        assert history["dcor"].iloc[1] == pytest.approx(by_hand(client, probes), rel=1e-9)
        assert client.training and client[2].training  # train mode restored, also of the dropout
    assert sorted(probe.values) == [2, 4] and sl.history["dcor"].notna().tolist() == [False, True] * 2


def test_bias_corrected_statistic(small):
    client, probes = encoder(), small.x_test[:40]
    history = SplitNN.vanilla(client, head(), small, config=SGD,
                              hooks={"client": LeakageProbe(probes, client, every=1, unbiased=True)}).fit(steps=1)
    with torch.no_grad():
        want = dcor.u_distance_correlation_sqr(probes.reshape(40, -1).double().numpy(), client(probes).double().numpy())
    assert history["dcor"].iloc[0] == pytest.approx(want, rel=1e-9)


def test_every_k_steps_and_each_epochs_last_step_nan_elsewhere(small):
    client = encoder()
    sl = SplitNN.vanilla(client, head(), small, config=SGD,
                         hooks={"client": LeakageProbe(small.x_test[:50], client, every=3)})
    history = sl.fit(epochs=2)  # 8 steps per epoch: steps 3, 6, 8 (end), then 9, 12, 15, 16 (end)
    assert len(history) == 16
    assert history.loc[history["dcor"].notna(), "step"].tolist() == [3, 6, 8, 9, 12, 15, 16]
    assert history["dcor"].dropna().between(0, 1).all()


def test_the_party_s_only_part_is_found_and_a_probed_run_trains_as_an_unprobed_one(small):
    plain_client, probed_client = encoder(dropout=0.2), encoder(dropout=0.2)
    plain = SplitNN.vanilla(plain_client, head(), small, config=SGD).fit(epochs=1)
    probe = LeakageProbe(small.x_test[:50], every=2)  # no part: the client's only one
    probed = SplitNN.vanilla(probed_client, head(), small, config=SGD, hooks={"client": probe}).fit(epochs=1)
    assert probe.part is probed_client
    assert probed.drop(columns="dcor").equals(plain)
    assert all(torch.equal(a, b) for a, b in zip(plain_client.parameters(), probed_client.parameters()))


def test_nopeek_lowers_the_probed_leakage_and_both_hooks_log_their_columns(small):
    final = {}
    for alpha in (0.0, 5.0):
        client, probes = encoder(), small.x_test[:100]
        hooks = Hooks(NoPeek(alpha, column="batch_dcor"), LeakageProbe(probes, client, every=8))
        history = SplitNN.vanilla(client, head(), small, config=ADAM, hooks={"client": hooks}).fit(epochs=3)
        assert history["batch_dcor"].notna().all() and history["dcor"].notna().sum() == 3  # each epoch's end
        final[alpha] = history["dcor"].dropna().tolist()
        assert final[alpha][-1] == pytest.approx(by_hand(client, probes), rel=1e-9)
    assert final[5.0][-1] < final[0.0][-1] - 0.15, final
    assert all(d < u for d, u in zip(final[5.0], final[0.0])), final  # lower at every epoch's end


def test_two_hooks_logging_dcor_on_one_party_are_an_error(small):
    client = encoder()
    sl = SplitNN.vanilla(client, head(), small, config=SGD,
                         hooks={"client": Hooks(NoPeek(1.0), LeakageProbe(small.x_test[:20], client, every=1))})
    with pytest.raises(ValueError, match=r"same history column\(s\) \['dcor'\]"):
        sl.fit(steps=1)


def test_the_u_shaped_client_is_probed_at_its_first_part(small):
    first, tail = encoder(), nn.Linear(16, 10)
    middle = nn.Sequential(nn.Linear(32, 16), nn.Tanh())
    history = SplitNN.u_shaped(first, middle, tail, small, config=SGD,
                               hooks={"client": LeakageProbe(small.x_test[:30], first, every=1)}).fit(steps=2)
    assert history["dcor"].iloc[-1] == pytest.approx(by_hand(first, small.x_test[:30]), rel=1e-9)
    with pytest.raises(ValueError, match="holds 2 model parts: pass the one to probe"):
        SplitNN.u_shaped(encoder(), middle, tail, small, config=SGD,
                         hooks={"client": LeakageProbe(small.x_test[:30])}).fit(steps=1)


@pytest.mark.parametrize("inputs, kwargs, message", [
    (torch.rand(1, 64), {}, "at least 2 samples"),
    (torch.rand(3, 64), {"unbiased": True}, "at least 4 samples for the bias-corrected"),
    (torch.tensor([[0.0, math.nan]]).repeat(4, 32), {}, "probe inputs holds NaN at index"),
    (torch.ones(5, 64, dtype=torch.long), {}, "must be floating point"),
    (torch.rand(5, 64), {"every": 0}, "every must be a positive int"),
    (torch.rand(5, 64), {"column": ""}, "column must be a non-empty string"),
    (torch.rand(5, 64), {"part": "client"}, "part must be the client's nn.Module"),
    (torch.rand(5, 10), {"part": "encoder"}, r"probe inputs \(5, 10\) do not fit the client part"),
])
def test_bad_input_is_refused_in_the_constructor(inputs, kwargs, message):
    if kwargs.get("part") == "encoder":
        kwargs = {**kwargs, "part": encoder()}
    with pytest.raises(ValueError, match=message):
        LeakageProbe(inputs, **kwargs)


def test_a_probe_on_a_party_without_inputs_or_parts_it_does_not_hold_is_refused(small):
    probe = LeakageProbe(small.x_test[:20], every=1)
    with pytest.raises(ValueError, match="'server', which holds no training inputs 'x'"):
        SplitNN.vanilla(encoder(), head(), small, config=SGD, hooks={"server": probe}).fit(steps=1)
    with pytest.raises(ValueError, match="is not one 'client' holds"):
        SplitNN.vanilla(encoder(), head(), small, config=SGD,
                        hooks={"client": LeakageProbe(small.x_test[:20], encoder(seed=3))}).fit(steps=1)


def test_repr_and_it_is_a_hook(small):
    probe = LeakageProbe(small.x_test[:20], every=4, column="leak")
    assert isinstance(probe, Hook) and repr(probe) == "LeakageProbe(20 probe inputs, every=4, unbiased=False, column='leak')"
