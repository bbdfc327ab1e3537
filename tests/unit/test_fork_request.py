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
