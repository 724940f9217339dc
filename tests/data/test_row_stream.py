"""Row streams (sparse_coding.data.row_stream): every rank gets as many batches of a split, none empty."""

from __future__ import annotations

from sparse_coding.data.row_stream import batch_plan, stream_plan


def test_batch_plans_keep_ranks_in_step():
    # 4500 rows, 4 ranks: 1125 each; with B=1125 all ranks get 1 batch
    assert [p[0][2] for p in stream_plan(4500, 4, 1, 1125)] == [[1125]] * 4
    # 4501 rows, 2 ranks, B=2250: 2251 + 2250 rows -> both get 2 batches, none empty
    plans = stream_plan(4501, 2, 1, 2250)
    assert [len(p[0][2]) for p in plans] == [2, 2] and all(min(p[0][2]) >= 1 for p in plans)
    assert sum(sum(p[0][2]) for p in plans) == 4501
    assert batch_plan(10, 3, 5) == [5, 4, 1]
