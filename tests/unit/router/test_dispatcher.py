from router.dispatcher import Candidate, least_loaded


def test_empty():
    assert least_loaded([]) is None


def test_fewest_in_flight_wins():
    assert least_loaded([Candidate("a", 3, 100), Candidate("b", 1, 10)]) == "b"


def test_ties_by_queue_then_free_blocks_then_id():
    assert least_loaded([Candidate("a", 1, 10, 50), Candidate("b", 1, 10, 20)]) == "b"
    assert least_loaded([Candidate("a", 1, 10), Candidate("b", 1, 20)]) == "b"
    assert least_loaded([Candidate("b", 1, 10), Candidate("a", 1, 10)]) == "a"
