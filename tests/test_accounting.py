"""The privacy accountant wrapper reproduces Opacus's golden values and refuses bad budgets."""
import math

import pytest
from opacus.accountants import RDPAccountant

from toolkit.accounting import PrivacyAccountant, epsilon, gaussian_sigma, noise_multiplier


def test_golden_epsilons_of_opacus_tests():
    kw = dict(noise_multiplier=1.5, sample_rate=0.04, delta=1e-5)
    assert epsilon(**kw, steps=2250, accountant="rdp") == pytest.approx(7.3291, abs=1e-3)
    # Opacus's PRV test runs int(90 // 0.04) steps, which is 2249 in floating point (90 / 0.04 for
    # RDP is 2250): 6.7774 is the PRV epsilon after 2,249 steps; after 2,250 it is 6.7791.
    assert epsilon(**kw, steps=2249, accountant="prv") == pytest.approx(6.7774, abs=1e-3)
    assert epsilon(**kw, steps=2250, accountant="prv") == pytest.approx(6.7791, abs=1e-3)


def test_golden_noise_multiplier_for_target_epsilon():
    z = noise_multiplier(target_epsilon=8, delta=1e-5, sample_rate=0.04, steps=2250)
    assert z == pytest.approx(1.416, abs=1e-3)
    assert epsilon(noise_multiplier=z, sample_rate=0.04, steps=2250, delta=1e-5) <= 8


def test_accountant_composes_steps_like_opacus_stepping_one_at_a_time():
    ours = PrivacyAccountant(delta=1e-5)
    theirs = RDPAccountant()
    for z, q, n in [(1.0, 0.01, 30), (2.0, 0.05, 20), (1.0, 0.01, 10)]:
        ours.step(noise_multiplier=z, sample_rate=q, steps=n)
        for _ in range(n):
            theirs.step(noise_multiplier=z, sample_rate=q)
    assert ours.steps == 60
    assert ours.epsilon() == theirs.get_epsilon(delta=1e-5)  # the cached one-step RDP changes no bit
    assert ours.epsilon(delta=1e-6) == theirs.get_epsilon(delta=1e-6)
    report = ours.report()
    assert report["delta"] == 1e-5 and report["epsilon_prv"] > 0
    assert PrivacyAccountant().epsilon() == 0.0


def test_gaussian_mechanism_calibration():
    assert gaussian_sigma(epsilon=0.5, delta=1e-5) == pytest.approx(2 * math.sqrt(2 * math.log(1.25e5)) * 1.0)
    assert gaussian_sigma(epsilon=0.5, delta=1e-5, sensitivity=3.0) == pytest.approx(3 * gaussian_sigma(epsilon=0.5, delta=1e-5))


@pytest.mark.parametrize("call, match", [
    (lambda: noise_multiplier(target_epsilon=1e-9, delta=1e-5, sample_rate=1.0, steps=10_000), "cannot be reached"),
    (lambda: noise_multiplier(target_epsilon=-1, delta=1e-5, sample_rate=0.1, steps=10), "target_epsilon"),
    (lambda: epsilon(noise_multiplier=-1.0, sample_rate=0.1, steps=10, delta=1e-5), "noise_multiplier"),
    (lambda: epsilon(noise_multiplier=1.0, sample_rate=1.5, steps=10, delta=1e-5), "sample_rate"),
    (lambda: epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1.0), "delta"),
    (lambda: epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5, accountant="gdp"), "accountant"),
    (lambda: gaussian_sigma(epsilon=2.0, delta=1e-5), "epsilon < 1"),
])
def test_bad_budgets_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_refused_step_leaves_the_history_alone():
    acc = PrivacyAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    with pytest.raises(ValueError, match="sample_rate"):
        acc.step(noise_multiplier=1.0, sample_rate=0.0)
    assert acc.history == [(1.0, 0.1, 5)]
