import pytest

from rlkv_vllm.slots import SlotManager, SlotsExhaustedError


def test_assign_release_reuse():
    m = SlotManager(3)
    assert m.assign(["a", "b"]) == [0, 1]
    assert m.assign(["b", "a", "c"]) == [1, 0, 2]
    assert (m.in_use, m.free, m.peak_in_use) == (3, 0, 3)
    with pytest.raises(SlotsExhaustedError):
        m.assign(["d"])
    assert m.release(["a", "zzz"]) == 1
    assert m.assign(["d"]) == [0]


def test_reclaims_dead_requests_only_when_full():
    m = SlotManager(2)
    m.assign(["a", "b"])
    assert m.assign(["c"], alive=lambda r: r != "a") == [0]
    assert m.slot_of("a") is None and m.slot_of("b") == 1
