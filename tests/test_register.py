"""Frame planning and sharding of sequence registration (tempeh.register)."""
import pytest

from tempeh.io.layout import FrameId
from tempeh.register import (frame_sort_key, manifest_name, mesh_path, parse_shard, plan_frames,
                             shard_frames, shard_units)


def _plan(lengths):
    """Sorted plan of sequences with the given frame counts (sequence k has lengths[k] frames)."""
    frames = [FrameId(f"s{k % 2}", f"q{k:02d}", f"{i:06d}") for k, n in enumerate(lengths)
              for i in range(n)]
    return sorted(frames, key=lambda f: (f.subject, f.sequence, frame_sort_key(f.frame)))


@pytest.mark.parametrize("lengths", [[5], [3, 7, 2, 9, 1], [4, 4, 4, 4], [1, 1], [30, 2, 2], []])
def test_shards_cover_every_frame_exactly_once(lengths):
    plan = _plan(lengths)
    for n in range(1, 8):
        parts = [shard_frames(plan, i, n) for i in range(n)]
        flat = [f for p in parts for f in p]
        assert sorted(flat) == sorted(plan), (lengths, n)
        assert len(flat) == len(set(flat)) == len(plan)
        for p in parts:  # each shard keeps plan order
            assert p == [f for f in plan if f in set(p)]
        # deterministic
        assert parts == [shard_frames(list(plan), i, n) for i in range(n)]


def test_whole_sequences_kept_together_when_there_are_enough():
    plan = _plan([3, 7, 2, 9, 1, 4])
    for n in (2, 3, 6):
        owner = {}
        for i in range(n):
            for f in shard_frames(plan, i, n):
                owner.setdefault(f[:2], set()).add(i)
        assert all(len(s) == 1 for s in owner.values()), n
    # load balance: 26 frames over 3 shards, largest first -> 9 / 9 / 8
    sizes = sorted(len(shard_frames(plan, i, 3)) for i in range(3))
    assert sizes == [8, 9, 9]


def test_a_long_sequence_is_split_into_contiguous_parts():
    plan = _plan([10])
    units = shard_units(plan, 4)
    assert [len(u) for u in units] == [3, 2, 3, 2]
    parts = [shard_frames(plan, i, 4) for i in range(4)]
    for p in parts:  # contiguous frame ranges
        idx = [plan.index(f) for f in p]
        assert idx == list(range(idx[0], idx[0] + len(idx)))
    assert sorted(len(p) for p in parts) == [2, 2, 3, 3]


def test_parse_shard():
    assert parse_shard("0/4") == (0, 4)
    assert parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ("4/4", "1/0", "-1/3", "a/b", "2"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    assert manifest_name((1, 4)) == "manifest.shard-1-of-4.json"
    assert manifest_name((0, 1)) == manifest_name(None) == "manifest.json"


def test_plan_sorting_and_paths(tmp_path):
    from tempeh.bench.data import write_tiny_capture
    from tempeh.io.layout import CaptureLayout

    root = write_tiny_capture(tmp_path / "cap", num_frames=3, num_views=2, width=16, height=12,
                              scan_points=5, sequences=("b", "a"))
    L = CaptureLayout(root)
    allf = plan_frames(L, all_frames=True)
    assert [f.sequence for f in allf] == ["a"] * 3 + ["b"] * 3
    assert plan_frames(L, sequences=["subj1/b"]) == [f for f in allf if f.sequence == "b"]
    given = [("subj1", "a", "10"), ("subj1", "a", "9"), ("subj1", "a", "9")]
    assert [f.frame for f in plan_frames(L, frames=given)] == ["9", "10"]  # numeric, deduplicated
    with pytest.raises(ValueError):
        plan_frames(L, frames=given, all_frames=True)
    assert mesh_path("out", allf[0], "obj").as_posix() == "out/subj1/a/a.000000.obj"
