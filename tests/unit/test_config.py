import fcntl
import json
import os

import pytest

from worker.cluster import Cluster, ClusterError, merge, merge_unsetting
from worker.config import ConfigError, check_nofile_within, from_dict, load
from worker.server import StartError, connection_cap, fds_for_sandboxes


def test_defaults_fill_in():
    config = from_dict({"cluster": "/c", "port": 9000}, "test")
    assert config.port == 9000 and config.limits.mem_mb == 256 and config.max_sandboxes > 0
    assert config.registry == "/c/registry"
    assert config.cgroup.startswith("openlambda/c-") and config.cgroup.endswith("/w9000")


@pytest.mark.parametrize("raw,words", [
    ({"cluster": "/c", "bogus": 1}, "unknown key"),
    ({"cluster": "/c", "limits": {"mem_mb": 0}}, "limits.mem_mb"),
    ({"cluster": "/c", "limits": {"mem_mb": "1"}}, "limits.mem_mb"),
    ({"cluster": "/c", "limits": {"memory": 1}}, "unknown limit"),
    ({"cluster": "/c", "port": 70000}, "port"),
    ({"cluster": "/c", "port": True}, "port"),
    ({"cluster": "", "port": 1}, "cluster"),
    ({"port": 1}, "cluster"),
    ({"cluster": "/c", "uid_base": 0}, "uid_base"),
    ({"cluster": "/c", "uid_base": 1000}, "uid_base"),
    ({"cluster": "/c", "uid_base": 1 << 32}, "uid_base"),
    ({"cluster": "/c", "max_sandboxes": 20000}, "below 16384"),
    ({"cluster": "/c", "max_connections": 0}, "max_connections must be a positive integer"),
    ({"cluster": "/c", "max_connections": "many"}, "max_connections"),
    ({"cluster": "/c", "egress": {"enabled": "yes"}}, "egress.enabled"),
    ({"cluster": "/c", "egress": {"subnet": "8.8.8.0/24"}}, "egress.subnet"),
    ({"cluster": "/c", "egress": {"subnet": "10.1.2.0/25"}}, "egress.subnet"),
    ({"cluster": "/c", "egress": {"subnet": "ten"}}, "egress.subnet"),
    ({"cluster": "/c", "egress": {"subnet": 16}}, "egress.subnet must be an IPv4 network"),
    ({"cluster": "/c", "egress": {"subnet": "169.254.0.0/16"}}, "egress.subnet"),
    ({"cluster": "/c", "egress": {"subnet": "127.0.0.0/16"}}, "egress.subnet"),
    ({"cluster": "/c", "egress": {"nat": "nft"}}, "unknown egress key"),
    ({"cluster": "/c", "egress": []}, "egress must be an object"),
    ({"cluster": "/c", "limits": {"nofile": 0}}, "limits.nofile"),
    ({"cluster": "/c", "limits": {"nofile": 3}}, "limits.nofile must be at least 16"),
    ({"cluster": "/c", "limits": {"nofile": 1 << 21}}, "limits.nofile must be at most"),
    ({"cluster": "/c", "limits": {"response_kb": 1 << 20}}, "limits.response_kb must be at most"),
    # Below what a shell already holds, cgroup v1 refuses the memory limit.
    ({"cluster": "/c", "limits": {"mem_mb": 1}}, "limits.mem_mb must be at least 16, not 1"),
    # The runtime unpacks at most 64 MiB of one message.
    ({"cluster": "/c", "limits": {"request_kb": 10000000}},
     "limits.request_kb must be at most 64512, not 10000000"),
    ({"cluster": "/c", "egress": {"spare": 1000}}, "egress.spare must be at most 253"),
    ({"cluster": "/c", "limits": {"procs": 99999999999}}, "limits.procs must be at most 4194304"),
    ({"cluster": "/c", "sandboxes_mem_mb": 0}, "sandboxes_mem_mb must be a positive integer"),
    ({"cluster": "/c", "sandboxes_mem_mb": 100}, r"sandboxes_mem_mb \(100\) is below limits.mem_mb"),
    ({"cluster": "/c", "idle_sec": 0}, "idle_sec must be null or a number of seconds above 0"),
    ({"cluster": "/c", "idle_sec": True}, "idle_sec must be null or a number"),
    ({"cluster": "/c", "idle_sec": 1e300}, "idle_sec must be null or a number of seconds above 0 "
                                           "and at most 86400"),
    # Null totals mean a share of this host's pids and memory: a limit
    # above it could never be used either.
    ({"cluster": "/c", "limits": {"procs": 1 << 22}}, r"limits.procs \(4194304\) is above what "
     r"all sandboxes together may have \(\d+: sandboxes_procs is null, a quarter of kernel"),
    ({"cluster": "/c", "limits": {"mem_mb": 1 << 30}}, r"limits.mem_mb \(1073741824\) is above "
     r"what all sandboxes together may have \(\d+: sandboxes_mem_mb is null, three quarters"),
    ({"cluster": "/c", "sandboxes_procs": "many"}, "sandboxes_procs must be a positive integer"),
    ({"cluster": "/c", "sandboxes_procs": 10}, r"sandboxes_procs \(10\) is below limits.procs \(64\)"),
    ({"cluster": "/c", "sandboxes_procs": 1 << 23}, "sandboxes_procs must be at most 4194304"),
    ({"cluster": "/c", "limits": {"cpu_percent": 1 << 40}}, "limits.cpu_percent must be at most"),
    ({"cluster": "/c", "cpu_wake_latency_us": -1}, "cpu_wake_latency_us must be null or a whole "
                                                   "number of microseconds up to 1000000, not -1"),
    ({"cluster": "/c", "cpu_wake_latency_us": 0.5}, "cpu_wake_latency_us must be null or a whole"),
    ({"cluster": "/c", "cpu_wake_latency_us": False}, "cpu_wake_latency_us must be null or a whole"),
    ({"cluster": "/c", "cpu_wake_latency_us": 1 << 31}, "cpu_wake_latency_us must be null or"),
])
def test_bad_configs_name_the_key(raw, words):
    with pytest.raises(ConfigError, match=words):
        from_dict(raw, "test")


def test_limits_at_their_bounds_are_taken():
    config = from_dict({"cluster": "/c", "limits": {"mem_mb": 16, "request_kb": 63 << 10},
                        "egress": {"spare": 253}}, "test")
    assert config.limits.mem_mb == 16 and config.limits.request_kb == 64512
    assert config.egress.spare == 253


def test_a_cluster_template_names_its_cluster(tmp_path):
    Cluster(str(tmp_path / "c")).create()
    config = load(str(tmp_path / "c" / "config" / "template.json"))
    assert config.cluster == str(tmp_path / "c") and config.port == 8080


def test_load_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="read config"):
        load(str(tmp_path / "missing.json"))
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="object"):
        load(str(tmp_path / "list.json"))
    (tmp_path / "deep.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="deep.json is not valid JSON: nested too deeply"):
        load(str(tmp_path / "deep.json"))


def test_merge_is_deep():
    assert merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 3}, "d": {"x": 1}}) == {
        "a": {"b": 3, "c": 2}, "d": {"x": 1}}


def test_merge_unsetting_removes_the_keys_set_to_null():
    template = {"port": 9000, "max_connections": 5, "limits": {"mem_mb": 512, "procs": 8}}
    assert merge_unsetting(template, {"port": None, "max_connections": None,
                                      "limits": {"mem_mb": None}, "absent": None}) == {
        "limits": {"procs": 8}}
    assert merge_unsetting(template, {"limits": None}) == {"port": 9000, "max_connections": 5}
    # Nulls in an object the template lacks are not written either.
    assert merge_unsetting({}, {"egress": {"spare": None, "enabled": True}}) == {
        "egress": {"enabled": True}}
    assert merge({"a": 1}, {"a": None}) == {"a": None}  # merge keeps a null


def test_setconf_writes_a_null_that_is_a_setting_of_its_own():
    """idle_sec and cpu_wake_latency_us have defaults of their own, and null
    means something else: "never" and "ask nothing of the kernel"."""
    update = {"idle_sec": None, "cpu_wake_latency_us": None, "max_connections": None}
    template = merge_unsetting({"idle_sec": 5, "max_connections": 3}, update)
    assert template == {"idle_sec": None, "cpu_wake_latency_us": None}
    config = from_dict(dict(template, cluster="/c"), "test")
    assert config.idle_sec is None and config.cpu_wake_latency_us is None
    defaults = from_dict({"cluster": "/c"}, "test")
    assert defaults.idle_sec == 600 and defaults.cpu_wake_latency_us == 0
    # Only at the top: a nested key of that name is removed as any other.
    assert merge_unsetting({"egress": {"idle_sec": 1}}, {"egress": {"idle_sec": None}}) == {
        "egress": {}}


def test_a_cluster_path_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    path = os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xffname")
    cluster = Cluster(path)
    assert cluster.cgroup.startswith("openlambda/bad")  # no UnicodeEncodeError
    with pytest.raises(ClusterError, match=r"^create cluster .*/bad\\xffname: a cluster path "
                                           r"must be valid UTF-8"):
        cluster.create()
    assert not os.path.lexists(path)
    os.makedirs(os.path.join(path, "config"))
    open(os.path.join(path, "config", "template.json"), "w").write("{}")
    with pytest.raises(ClusterError, match=r"^open cluster .*/bad\\xffname: a cluster path"):
        cluster.check()


@pytest.mark.parametrize("name,shown", [("n\nl", "n\\nl"), ("tab\there", "tab\\there"),
                                        ("esc\x1b[31m", "esc\\x1b[31m"), ("c1\x9b", "c1\\x9b")])
def test_a_cluster_path_with_a_control_character_is_refused_in_one_line(tmp_path, name, shown):
    """The kernel refuses a newline in a cgroup's name: no worker could
    start in such a cluster.  Refused as a path that is not UTF-8 is."""
    path = str(tmp_path / name)
    with pytest.raises(ClusterError) as refused:
        Cluster(path).create()
    assert str(refused.value) == (
        "create cluster %s/%s: a cluster path must not hold control characters (a newline, a "
        "tab...): it names the cluster's cgroups" % (tmp_path, shown))
    assert not os.path.lexists(path)


def test_a_template_that_cannot_be_written_leaves_the_old_one_and_no_temporary_file(tmp_path):
    cluster = Cluster(str(tmp_path / "c"))
    cluster.create()
    before = open(cluster.template).read()
    # Its temporary file cannot be made (a full disk is tested in test_admin.py).
    os.symlink(str(tmp_path / "no" / "such" / "dir"), "%s.%d.tmp" % (cluster.template, os.getpid()))
    with pytest.raises(ClusterError, match=r"^write %s: No such file or directory$"
                                           % cluster.template):
        cluster.write_template({"port": 1})
    assert open(cluster.template).read() == before
    assert os.listdir(tmp_path / "c" / "config") == ["template.json"]


def test_clusters_with_the_same_name_get_distinct_cgroups(tmp_path):
    assert Cluster(str(tmp_path / "a" / "c")).cgroup != Cluster(str(tmp_path / "b" / "c")).cgroup


def test_each_port_gets_its_own_uid_range():
    from sandbox.uids import UID_SLOTS
    a = from_dict({"cluster": "/c", "port": 8080}, "test").uid_base
    b = from_dict({"cluster": "/c", "port": 8081}, "test").uid_base
    assert b - a == UID_SLOTS and a >= 1 << 30
    last = from_dict({"cluster": "/c", "port": 65535}, "test").uid_base + UID_SLOTS - 1
    assert last < 1 << 31  # tools that keep uids in a signed int cope
    assert from_dict({"cluster": "/c", "uid_base": 200000}, "test").uid_base == 200000


def test_egress_defaults_off_with_a_private_range():
    egress = from_dict({"cluster": "/c"}, "test").egress
    assert egress.enabled is False and egress.subnet == "10.213.0.0/16" and egress.spare == 2


def test_connections_get_what_the_open_file_limit_leaves_after_sandboxes():
    config = from_dict({"cluster": "/c", "max_sandboxes": 100, "pool_size": 8}, "test")
    assert config.max_connections is None
    for_sandboxes = fds_for_sandboxes(config)
    assert for_sandboxes >= 3 * (100 + 2 * 8)  # channel, output, namespace: ready and dying too
    assert connection_cap(config, for_sandboxes + 500) == 500
    capped = from_dict({"cluster": "/c", "max_sandboxes": 100, "max_connections": 50}, "test")
    assert connection_cap(capped, 20000) == 50
    with pytest.raises(StartError, match="open-file limit .1024. leaves no fd for connections"):
        connection_cap(from_dict({"cluster": "/c", "max_sandboxes": 1000}, "test"), 1024)
    # The worker raises its soft limit itself: only the hard one helps.
    with pytest.raises(StartError, match=r"raise the hard limit \(ulimit -Hn\) or lower them$"):
        connection_cap(from_dict({"cluster": "/c", "max_sandboxes": 1000}, "test"), 1024)


def test_a_handler_nofile_above_the_workers_own_limit_is_refused():
    check_nofile_within("test", 4096, 4096)
    with pytest.raises(ConfigError, match="test: limits.nofile is 4096, above the worker's "
                                          "open-file limit .1024."):
        check_nofile_within("test", 4096, 1024)


def test_a_port_lock_is_held_by_one_worker_and_goes_with_it(tmp_path):
    cluster = Cluster(str(tmp_path / "c"))
    cluster.create()
    first = cluster.claim_port(9000)
    assert first is not None and cluster.claim_port(9000) is None
    cluster.remove_stale_locks()  # held: it stays
    assert os.path.exists(cluster.lock_file(9000))
    cluster.forget_worker(9000)
    os.close(first)
    assert not os.path.exists(cluster.lock_file(9000))
    second = cluster.claim_port(9000)
    assert second is not None and cluster.claim_port(9000) is None
    os.close(second)  # as if SIGKILLed: the file stays, and admin kill removes it
    cluster.remove_stale_locks()
    assert os.listdir(tmp_path / "c" / "workers") == [str(9000)]  # only its record, which kill removes


def test_a_lock_taken_on_a_removed_file_is_taken_again_on_the_new_one(tmp_path, monkeypatch):
    cluster = Cluster(str(tmp_path / "c"))
    cluster.create()
    holders = [cluster.claim_port(9000)]
    flock = fcntl.flock

    def holder_stops_first(fd, op):
        # The second worker has opened the file; the holder stops (removing
        # it) before the second one's flock, which then locks a removed file.
        if holders:
            cluster.forget_worker(9000)
            os.close(holders.pop())
        return flock(fd, op)

    monkeypatch.setattr("sandbox.filelock.fcntl.flock", holder_stops_first)
    second = cluster.claim_port(9000)
    monkeypatch.setattr("sandbox.filelock.fcntl.flock", flock)
    try:
        assert os.path.samestat(os.fstat(second), os.stat(cluster.lock_file(9000)))
        assert cluster.claim_port(9000) is None
    finally:
        os.close(second)


def test_concurrency_is_null_by_default_or_a_positive_number():
    assert from_dict({"cluster": "/c"}, "test").limits.concurrency is None
    assert from_dict({"cluster": "/c", "limits": {"concurrency": 4}}, "test").limits.concurrency == 4
    with pytest.raises(ConfigError, match="limits.concurrency must be a positive integer"):
        from_dict({"cluster": "/c", "limits": {"concurrency": 0}}, "test")
