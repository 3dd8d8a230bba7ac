"""Which worker a scale-in removes (kvflock.operator.scale_in): the one whose going costs least."""

from kvflock.operator.scale_in import Candidate, removal_order


def test_a_worker_that_is_not_ready_goes_first():
    assert removal_order([Candidate("busy", 0, True, 5, 900), Candidate("starting", 1, False)])[0] == "starting"


def test_of_ready_workers_the_one_with_least_in_flight_goes_first():
    assert removal_order([Candidate("a", 0, True, 3, 0), Candidate("b", 1, True, 1, 500)])[0] == "b"


def test_at_equal_load_the_worker_with_the_smaller_cache_goes_first():
    order = removal_order([Candidate("hot", 2, True, 0, 800), Candidate("cold", 0, True, 0, 10)])
    assert order == ["cold", "hot"]


def test_at_equal_load_and_cache_the_newest_goes_first():
    assert removal_order([Candidate("w-0", 0, True, 0, 0), Candidate("w-1", 1, True, 0, 0)]) == ["w-1", "w-0"]


def test_a_worker_not_probed_yet_counts_as_idle_and_cacheless():
    assert removal_order([Candidate("probed", 0, True, 0, 40), Candidate("unknown", 1, True)]) == ["unknown", "probed"]
