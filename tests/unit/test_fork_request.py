"""A zygote's "fork" message: one per batch of shells, their fds in one list."""
import pytest

from sandbox.runtime.zygote import split_fork_request

REQUEST = {"op": "fork", "scratch_mb": 64, "netns": True,
           "shells": [{"id": "sb-1", "uid": 1001, "nfds": 3},
                      {"id": "sb-2", "uid": 1002, "netns_given": True, "nfds": 4}]}


def test_each_shell_gets_the_common_fields_and_its_own_fds():
    (one, fds1), (two, fds2) = split_fork_request(REQUEST, [10, 11, 12, 20, 21, 22, 23])
    assert one["id"] == "sb-1" and one["scratch_mb"] == 64 and "shells" not in one
    assert fds1 == [10, 11, 12] and fds2 == [20, 21, 22, 23] and two["netns_given"]


def test_fds_that_do_not_add_up_refuse_the_whole_request():
    # The kernel drops the fds that do not fit when the zygote has no room
    # for them: a slice would shift, and a shell would miss its cgroups.
    with pytest.raises(ValueError, match="6 fds came of the 7"):
        split_fork_request(REQUEST, [10, 11, 12, 20, 21, 22])


def test_the_worker_sends_as_few_messages_as_the_fds_allow():
    from sandbox.manager import fd_batches
    from sandbox.runtime.proto import MAX_FDS
    shells = [("sb-%d" % i, list(range(7 if i % 2 else 6))) for i in range(80)]
    batches = list(fd_batches(shells))
    assert [item for batch in batches for item in batch] == shells  # all, in order
    assert all(sum(len(fds) for _, fds in batch) <= MAX_FDS for batch in batches)
    assert len(batches) == 3  # 520 fds in 253-fd messages
