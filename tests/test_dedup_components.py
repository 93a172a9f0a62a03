"""Connected components and the keep rule: the graph core of every deduplication stage."""

import numpy as np
import pytest

from curation.dedup.components import component_sizes, connected_components, pick_keepers


def test_components_of_a_known_graph():
    # 0-1-2 chained, 3-4 paired, 5 alone, 6-7 via a duplicate edge and a self loop.
    src = np.array([0, 1, 3, 6, 7, 6, 5])
    dst = np.array([1, 2, 4, 7, 6, 7, 5])
    labels = connected_components(8, src, dst)
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    assert component_sizes(labels).tolist() == [3, 3, 3, 2, 2, 1, 2, 2]


def test_labels_do_not_depend_on_edge_order_or_direction():
    rng = np.random.default_rng(0)
    src, dst = rng.integers(0, 500, 300), rng.integers(0, 500, 300)
    perm = rng.permutation(300)
    a = connected_components(500, src, dst)
    b = connected_components(500, dst[perm], src[perm])
    assert (a == b).all()
    # Canonical numbering: a component's label is its rank by smallest member.
    firsts = [np.flatnonzero(a == c)[0] for c in range(a.max() + 1)]
    assert firsts == sorted(firsts)


def test_no_edges_means_every_node_alone():
    assert connected_components(4, np.array([], int), np.array([], int)).tolist() == [0, 1, 2, 3]
    assert connected_components(0, np.array([], int), np.array([], int)).tolist() == []


def test_long_chain_is_one_component_in_linear_time():
    n = 200_000
    labels = connected_components(n, np.arange(n - 1), np.arange(1, n))
    assert (labels == 0).all()


def test_matches_a_reference_union_find_on_random_graphs():
    rng = np.random.default_rng(1)
    n = 300
    src, dst = rng.integers(0, n, 250), rng.integers(0, n, 250)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(src, dst):
        parent[find(a)] = find(b)
    labels = connected_components(n, src, dst)
    for i in range(n):
        for j in range(i + 1, n):
            assert (labels[i] == labels[j]) == (find(i) == find(j))


def test_bad_edges_are_rejected():
    with pytest.raises(ValueError):
        connected_components(3, np.array([0]), np.array([3]))
    with pytest.raises(ValueError):
        connected_components(3, np.array([0, 1]), np.array([1]))


def test_keeper_is_largest_area_then_smallest_uid():
    labels = np.array([0, 0, 0, 1, 1, 2])
    area = np.array([100, 400, 400, 50, 50, 0])
    uid = np.array([5, 9, 7, 3, 1, 8])
    keepers = pick_keepers(labels, area, uid)
    # Component 0: rows 1 and 2 tie on area, row 2 has the smaller uid.
    assert keepers.tolist() == [2, 2, 2, 4, 4, 5]
