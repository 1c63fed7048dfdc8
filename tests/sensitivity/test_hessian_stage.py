"""How the Hessian stage splits a round of batches over ranks (`qanalyze.sensitivity.hessian_stage`)."""

from qanalyze.sensitivity.hessian_stage import assignment

UNITS = ["trace", "block 0", "block 1", "q", "k", "v"]


def test_a_round_with_a_batch_per_rank_gives_each_rank_a_whole_batch():
    pending = {4: UNITS, 5: UNITS[1:]}
    assert [assignment([4, 5], r, 2, pending) for r in range(2)] == [(4, UNITS), (5, UNITS[1:])]


def test_fewer_batches_than_ranks_split_each_batchs_units_and_cover_them_once():
    pending = {7: UNITS, 8: UNITS[:4]}
    parts = [assignment([7, 8], r, 5, pending) for r in range(5)]
    assert [b for b, _ in parts] == [7, 8, 7, 8, 7]
    for b in (7, 8):
        mine = [unit for batch, units in parts if batch == b for unit in units]
        assert sorted(mine) == sorted(pending[b])  # each unit once
    assert parts[0][1] == ["trace", "q"] and parts[2][1] == ["block 0", "k"] and parts[4][1] == ["block 1", "v"]
