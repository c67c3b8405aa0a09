import math

import pytest

from gradsparse.schedules import Schedule


def test_constant_step_decay_and_warmup_by_hand():
    assert Schedule(lr=0.3)(17, 4.0) == 0.3
    s = Schedule(kind="step_decay", lr=1.0, milestones=[150, 250])
    assert s(0, 149.9) == 1.0
    assert s(0, 150.0) == pytest.approx(0.1)
    assert s(0, 260.0) == pytest.approx(0.01)
    w = Schedule(kind="step_decay", lr=1.6, milestones=[150], warmup_epochs=5, warmup_start=0.1)
    assert w(0, 0.0) == pytest.approx(0.1)
    assert w(0, 2.5) == pytest.approx(0.1 + 0.5 * 1.5)
    assert w(0, 5.0) == pytest.approx(1.6)


def test_inverse_power_and_paper004_schedules_by_hand():
    s = Schedule(kind="inverse_power", lr=2.0, power=0.5)
    assert s(3) == pytest.approx(2.0 / 2.0)
    m = Schedule(kind="momentum_aware", lr=1.0, power=0.5, beta=0.9)
    # eta_t = eta (1/t^a - beta/(t+1)^a), t counted from 1
    assert m(0) == pytest.approx(1.0 - 0.9 / math.sqrt(2))
    assert m(3) == pytest.approx(1 / 2 - 0.9 / math.sqrt(5))
    c = Schedule(kind="strongly_convex", beta=0.5, mu=0.1)
    # (1 - beta t/(t+1)) / (mu t)
    assert c(0) == pytest.approx((1 - 0.5 * 1 / 2) / 0.1)
    assert c(9) == pytest.approx((1 - 0.5 * 10 / 11) / (0.1 * 10))


def test_stagewise_stages():
    s = Schedule(kind="stagewise", lr=0.6, stage_steps=[2, 3])
    assert [s.stage_of(t) for t in range(8)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert [s.stage_start(t) for t in range(6)] == [False, False, True, False, False, True]
    assert s(0) == pytest.approx(0.6) and s(2) == pytest.approx(0.3) and s(5) == pytest.approx(0.2)


def test_bad_schedules_are_named():
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        Schedule(kind="cosine")
    with pytest.raises(ValueError, match="stage_steps"):
        Schedule(kind="stagewise")
