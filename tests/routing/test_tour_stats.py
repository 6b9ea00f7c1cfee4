"""benchmarks/routing_tour_stats.py: route splitting, voluntary depot returns and 2-opt on small tours."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stats():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("routing_tour_stats", REPO / "benchmarks" / "routing_tour_stats.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_routes_split_at_the_depot_and_ignore_empty_trips(stats):
    assert stats.routes_of([3, 1, 0, 2, 0, 0, 4, 0]) == [[3, 1], [2], [4]]
    assert stats.routes_of([0, 1, 2]) == [[1, 2]]  # a sequence may start at the depot and end without it


def test_a_return_is_voluntary_only_when_an_unvisited_customer_still_fits(stats):
    demand = np.array([4.0, 5.0, 3.0, 6.0])  # customers 1..4, capacity 10
    # 1 (4) + 2 (5): 1 left, nothing fits -> forced; 3 (3): 7 left and 4 (6) fits -> voluntary
    returns, voluntary, spare = stats.depot_returns([1, 2, 0, 3, 0, 4, 0], demand, 10.0)
    assert (returns, voluntary) == (2, 1) and spare == [pytest.approx(0.7)]
    # the final return (nothing left to serve) is not counted
    assert stats.depot_returns([1, 2, 3, 0], np.array([1.0, 1.0, 1.0]), 10.0) == (0, 0, [])


def test_two_opt_untangles_a_crossed_route_and_keeps_its_customers(stats):
    xy = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])  # depot + a unit square's corners
    crossed = [2, 1, 3]  # depot -> (1,1) -> (0,1) -> (1,0) -> depot crosses itself
    better = stats.two_opt(crossed, xy)
    assert sorted(better) == sorted(crossed)
    assert stats.route_length(better, xy) == pytest.approx(4.0)
    assert stats.route_length(crossed, xy) > 4.0 + 0.5
