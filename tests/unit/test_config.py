import subprocess
import sys
from pathlib import Path

import pytest

from qmpfd.config import load_config
from qmpfd.errors import InvalidRequest
from qmpfd.vm.registry import configured_policies

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "qmpfd.toml"


def test_documented_example_loads() -> None:
    c = load_config(EXAMPLE)
    assert c.daemon.socket == Path("/run/qmpfd/qmpfd.sock")
    assert c.daemon.socket_mode == 0o660


def test_defaults_without_a_file() -> None:
    c = load_config(None)
    assert c.timeouts.pending_expiry > 0 and c.vm == []


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[daemon]\nsockett = '/x'\n")
    with pytest.raises(InvalidRequest, match=r"daemon\.sockett"):
        load_config(p)


def test_policy_timeout_override(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[timeouts.policy.pcie-native]\nunplug = 42\n")
    table = configured_policies(load_config(p))
    assert table["pcie-native"].timeouts.unplug == 42
    assert table["acpi-pcihp"].timeouts.unplug != 42


def test_example_access_section() -> None:
    c = load_config(EXAMPLE)
    assert c.access.qmp_passthrough is False
    assert Path("/run/qemu") in c.access.qmp_dirs


def test_bad_log_level_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "qmpfd.toml"
    cfg.write_text('[daemon]\nlog-level = "verbose"\n')
    out = subprocess.run([sys.executable, "-m", "qmpfd", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "log-level" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_text_log_format_keeps_the_structured_fields() -> None:
    import logging

    from qmpfd.logs import TextFormatter

    record = logging.LogRecord("qmpfd.vm", logging.WARNING, __file__, 1, "unplug failed", (),
                               None)
    record.vm = "web1"
    record.error = "guest is busy (power indicator blinking)"
    line = TextFormatter().format(record)
    assert "unplug failed" in line and "vm=web1" in line
    assert 'error="guest is busy (power indicator blinking)"' in line


@pytest.mark.parametrize(("listen", "ok"), [
    ("unix:/run/qmpfd/metrics.sock", True), ("127.0.0.1:9477", True), ("[::1]:9477", True),
    ("0.0.0.0:9477", False), ("10.0.0.1:9477", False), ("9477", False)])
def test_metrics_listen_is_local_only(tmp_path: Path, listen: str, ok: bool) -> None:
    cfg = tmp_path / "qmpfd.toml"
    cfg.write_text(f'[metrics]\nlisten = "{listen}"\n')
    if ok:
        assert load_config(cfg).metrics.listen == listen
    else:
        with pytest.raises(InvalidRequest, match=r"metrics\.listen"):
            load_config(cfg)


def test_a_reload_names_every_change_it_cannot_apply() -> None:
    from qmpfd.config import Config, needs_restart

    running = Config()
    new = Config.model_validate({
        "daemon": {"event-ring": 64, "log-level": "debug"},
        "timeouts": {"command": 5, "policy": {"acpi-pcihp": {"reuse-delay": 1}}},
        "metrics": {"listen": "unix:/run/qmpfd/metrics.sock"},
        "access": {"tenants": [{"group": 5, "vms": ["a-*"]}], "audit-log": "/tmp/a.log"},
        "vm": [{"name": "x", "qmp": "/run/qemu/x.qmp"}]})
    assert needs_restart(running, new) == [
        "access.audit-log", "daemon.event-ring", "metrics.listen", "timeouts.command",
        "timeouts.policy", "vm"]
    assert needs_restart(running, Config()) == []
