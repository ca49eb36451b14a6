import pytest

import auxhead
from auxhead import SCHEDULES, get_schedule


@pytest.mark.parametrize(
    "name, at0, at_half, at1",
    [
        ("constant", 1.0, 1.0, 1.0),
        ("linear_decay", 1.0, 0.5, 0.0),
        ("linear_ramp", 0.0, 0.5, 1.0),
        ("cosine", 1.0, 0.5, 0.0),
    ],
)
def test_schedules_by_hand(name, at0, at_half, at1):
    schedule = get_schedule(name)
    assert schedule is SCHEDULES[name]
    assert [schedule(t) for t in (0.0, 0.5, 1.0)] == pytest.approx([at0, at_half, at1])


def test_get_schedule_forms():
    assert get_schedule("constant") is auxhead.constant
    fn = lambda t: t * t  # noqa: E731
    assert get_schedule(fn) is fn
    with pytest.raises(ValueError, match="unknown schedule 'warmup'.*constant"):
        get_schedule("warmup")
    with pytest.raises(TypeError, match="int"):
        get_schedule(3)
