from sandbox import uids


def test_a_host_that_blocks_user_namespaces_is_named(tmp_path, monkeypatch):
    setting = tmp_path / "apparmor_restrict_unprivileged_userns"
    setting.write_text("1\n")
    monkeypatch.setattr(uids, "USERNS_BLOCKERS", (
        (str(tmp_path / "absent"), "0", "never"),
        (str(setting), "1", "AppArmor says no"),
    ))
    assert uids.user_namespace_blocker() == "AppArmor says no"
    setting.write_text("0\n")
    assert uids.user_namespace_blocker() is None
