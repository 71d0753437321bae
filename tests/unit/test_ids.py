from runs.ids import uuid7


def test_it_makes_strictly_increasing_version_7_ids():
    ids = [uuid7() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {i.version for i in ids} == {7}
