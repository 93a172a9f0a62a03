"""Connected components of an edge set that no task holds whole.

Edges travel as ``(node, nbr)`` rows in both directions, partitioned by ``node``, so a reduce
task sees the whole neighbourhood of the nodes of its partition. The algorithm is the alternating
one of Kiveris et al., "Connected Components in MapReduce and Beyond" (SoCC 2014): rounds of

* large-star: every node links its larger neighbours to the smallest node of its neighbourhood;
* small-star: every node links itself and its smaller neighbours to the smallest of them;

until two consecutive rounds leave the edge set unchanged (checked by a count and an
order-independent hash of the deduplicated edges each round reads). At that fixpoint every
component is a star around its smallest uid, which becomes the label of its nodes: the same
labels, whatever the partitioning, as the single-task ``scipy`` pass gives.

When the edge set fits one task (``max_partition_rows``), one task labels it with scipy instead.
Producers shrink their edges before writing with ``star_forest`` (each local component becomes a
star around its smallest node), so most components are already stars before the first round.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as _scipy_components

from curation import schema
from curation.partitioned.files import with_partition
from curation.partitioned.keys import combine, mix64, partition_of
from curation.partitioned.steps import ComponentsStep, Output, ReduceStep, TaskContext

MAX_ROUNDS = 200
EDGES, LABEL = "edges", "label"


# ---------------------------------------------------------------------------------------------
# Edge helpers for producers
# ---------------------------------------------------------------------------------------------
def star_forest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (node, smallest node of its component) with the connectivity of edges a--b."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    keep = a != b
    a, b = a[keep], b[keep]
    if len(a) == 0:
        return a, b
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    n = len(nodes)
    graph = coo_matrix((np.ones(len(a), np.int8), (inv[: len(a)], inv[len(a) :])), shape=(n, n))
    _, comp = _scipy_components(graph, directed=True, connection="weak")
    smallest = np.full(comp.max() + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(smallest, comp, nodes)
    root = smallest[comp]
    leaf = nodes != root
    return nodes[leaf], root[leaf]


def edge_rows(a: np.ndarray, b: np.ndarray, partitions: int) -> pa.Table:
    """Undirected edges a--b as rows in both directions, partitioned by ``node``."""
    node = np.concatenate([a, b]).astype(np.int64)
    nbr = np.concatenate([b, a]).astype(np.int64)
    table = pa.table({"node": pa.array(node, pa.int64()), "nbr": pa.array(nbr, pa.int64())})
    return with_partition(table, partition_of(node, partitions, salt=0x5EED))


def _label_rows(node: np.ndarray, label: np.ndarray, ctx: TaskContext, output: str) -> pa.Table:
    table = pa.table({schema.UID: pa.array(node, pa.int64()), LABEL: pa.array(label, pa.int64())})
    return with_partition(table, ctx.groups_of_uids(node))


# ---------------------------------------------------------------------------------------------
# Per-partition operations
# ---------------------------------------------------------------------------------------------
def _read_edges(part) -> tuple[np.ndarray, np.ndarray]:
    t = part.read(["node", "nbr"])
    if t is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    node, nbr = t.column("node").to_numpy(), t.column("nbr").to_numpy()
    keep = node != nbr
    node, nbr = node[keep], nbr[keep]
    order = np.lexsort((nbr, node))
    node, nbr = node[order], nbr[order]
    first = np.r_[True, (node[1:] != node[:-1]) | (nbr[1:] != nbr[:-1])] if len(node) else np.zeros(0, bool)
    return node[first], nbr[first]


def _signature(node: np.ndarray, nbr: np.ndarray, ctx: TaskContext) -> None:
    """Count and xor-hash of the undirected edges (each counted once, at its smaller end)."""
    once = node < nbr
    ctx.count("edges_in", int(once.sum()))
    h = combine(mix64(node[once]), nbr[once])
    ctx.count("edges_hash_xor", int(np.bitwise_xor.reduce(h)) if len(h) else 0)


def _group_min(node: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows sorted by node: (distinct nodes, start of each group, min value per group)."""
    starts = np.flatnonzero(np.r_[True, node[1:] != node[:-1]])
    return node[starts], starts, np.minimum.reduceat(values, starts)


def _emit(a: np.ndarray, b: np.ndarray, ctx: TaskContext) -> dict:
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = lo != hi
    pairs = np.unique(np.stack([lo[keep], hi[keep]], axis=1), axis=0) if keep.any() else np.zeros((0, 2), np.int64)
    return {EDGES: edge_rows(pairs[:, 0], pairs[:, 1], ctx.partitions[EDGES])}


def large_star(part, ctx: TaskContext) -> dict:
    node, nbr = _read_edges(part)
    _signature(node, nbr, ctx)
    if len(node) == 0:
        return {}
    nodes, starts, mins = _group_min(node, nbr)
    m = np.minimum(nodes, mins)[np.repeat(np.arange(len(nodes)), np.diff(np.r_[starts, len(node)]))]
    larger = nbr > node
    return _emit(nbr[larger], m[larger], ctx)


def small_star(part, ctx: TaskContext) -> dict:
    node, nbr = _read_edges(part)
    _signature(node, nbr, ctx)
    smaller = nbr < node
    node, nbr = node[smaller], nbr[smaller]
    if len(node) == 0:
        return {}
    nodes, starts, mins = _group_min(node, nbr)
    m = mins[np.repeat(np.arange(len(nodes)), np.diff(np.r_[starts, len(node)]))]
    return _emit(np.concatenate([nbr, nodes]), np.concatenate([m, mins]), ctx)


def labels_from_stars(part, ctx: TaskContext, output: str = "labels") -> dict:
    node, nbr = _read_edges(part)
    if len(node) == 0:
        return {}
    nodes, _, mins = _group_min(node, nbr)
    ctx.count("nodes", len(nodes))
    return {output: _label_rows(nodes, np.minimum(nodes, mins), ctx, output)}


def labels_in_one_task(parts, ctx: TaskContext, output: str = "labels") -> dict:
    a, b = [], []
    for part in parts:
        node, nbr = _read_edges(part)
        a.append(node)
        b.append(nbr)
    node, nbr = (np.concatenate(a), np.concatenate(b)) if a else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    leaf, root = star_forest(node, nbr)
    if len(leaf) == 0:
        return {}
    nodes = np.concatenate([leaf, np.unique(root)])
    labels = np.concatenate([root, np.unique(root)])
    ctx.count("nodes", len(nodes))
    return {output: _label_rows(nodes, labels, ctx, output)}


# ---------------------------------------------------------------------------------------------
# Driver: rounds until the fixpoint
# ---------------------------------------------------------------------------------------------
def _round_name(step: ComponentsStep, r: int) -> str:
    return f"{step.name}.r{r:03d}"


def _round_input(step: ComponentsStep, r: int) -> str:
    return step.input if r == 0 else f"{_round_name(step, r - 1)}/{EDGES}"


def inner_step(step: ComponentsStep, name: str, plan: dict) -> ReduceStep:
    """The reduce step ``name`` of this components computation (rebuilt the same in workers)."""
    facts = plan["facts"].get(step.name, {})
    out = step.output
    if name == step.name:
        if facts.get("mode") == "one_task":
            return ReduceStep(name, step.input, lambda parts, ctx: labels_in_one_task(parts, ctx, out), [Output(out, 1)], whole=True)
        return ReduceStep(name, facts["final_input"], lambda part, ctx: labels_from_stars(part, ctx, out), [Output(out, 1)])
    r = int(name.rsplit(".r", 1)[1])
    return ReduceStep(name, _round_input(step, r), large_star if r % 2 == 0 else small_star, [Output(EDGES, 1)])


def run(engine, step: ComponentsStep) -> None:
    plan, n_groups = engine.plan, len(engine.plan["groups"])
    rows = plan["dataset_rows"].get(step.input, 0)
    facts = plan["facts"].setdefault(step.name, {})
    if "mode" not in facts:
        facts["mode"] = "one_task" if rows <= engine.execution.max_partition_rows else "rounds"
        engine._save(plan)
    labels = [Output(step.output, n_groups)]
    if facts["mode"] == "one_task":
        engine.set_partitions(step.name, labels)
        engine.run_step_tasks(step.name, [0], [step.output])
        return
    if "final_input" not in facts:
        signatures: list[tuple] = []
        for r in range(MAX_ROUNDS):
            name, source = _round_name(step, r), _round_input(step, r)
            size = plan["dataset_rows"].get(source, 0)
            engine.set_partitions(name, [Output(EDGES, lambda s, n=size: s.partitions_for(n))])
            stats = engine.run_step_tasks(name, engine.input_partitions(source), [EDGES])
            edges = sum(s["counters"].get("edges_in", 0) for s in stats)
            digest = 0
            for s in stats:
                digest ^= int(s["counters"].get("edges_hash_xor", 0))
            signatures.append((edges, digest))
            if len(signatures) >= 3 and signatures[-1] == signatures[-2] == signatures[-3]:
                facts.update({"final_input": source, "rounds": r + 1, "edges": edges})
                engine._save(plan)
                break
        else:
            raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
    engine.set_partitions(step.name, labels)
    engine.run_step_tasks(step.name, engine.input_partitions(facts["final_input"]), [step.output])
