"""scripts/install and scripts/uninstall into a scratch root: the venv under /opt,
the config kept when edited, units systemd accepts, completions, man pages, the socket enabled;
then everything but the config and state removed again."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def container_like(root: Path) -> None:
    """What systemd-analyze needs inside the root to verify units: the system's unit files
    (targets) and /bin/kill (ExecReload)."""
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/kill", root / "usr/bin/kill")
    (root / "bin").symlink_to("usr/bin")


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out


def test_install_verify_reinstall_and_uninstall(tmp_path: Path) -> None:
    root = tmp_path / "root"
    container_like(root)
    run(ROOT / "scripts/install", "--root", root)
    units = root / "etc/systemd/system"
    run("systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/qmpfd.service",
        "/etc/systemd/system/qmpfd.socket")
    assert (units / "sockets.target.wants/qmpfd.socket").is_symlink()
    assert "ExecStart=/opt/qmpfd/bin/qmpfd --config /etc/qmpfd/qmpfd.toml" in \
        (units / "qmpfd.service").read_text()
    assert run(root / "opt/qmpfd/bin/qmpfd", "--version").stdout.startswith("qmpfd 0.")
    assert run(root / "opt/qmpfd/bin/qmpfctl", "--version").stdout.startswith("qmpfctl 0.")
    share = root / "usr/share"
    assert "qmpfctl" in (share / "bash-completion/completions/qmpfctl").read_text()
    assert (share / "zsh/vendor-completions/_qmpfctl").read_text().startswith("#compdef")
    for page in ("man8/qmpfd.8", "man1/qmpfctl.1", "man5/qmpfd.toml.5"):
        text = run("man", "-l", share / "man" / page).stdout
        assert "NAME" in text and "qmpfd" in text, page
    assert "state-dir" in run("man", "-l", share / "man/man5/qmpfd.toml.5").stdout
    # The wheel is the daemon and the CLI: no lab, no tests in the venv.
    site = next((root / "opt/qmpfd/lib").glob("python3*/site-packages"))
    assert (site / "qmpfd").is_dir() and not (site / "lab").exists()
    assert not (site / "tests").exists()

    # An edited config survives a reinstall; the shipped one goes beside it.
    config = root / "etc/qmpfd/qmpfd.toml"
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    run(ROOT / "scripts/install", "--root", root)
    assert "# edited by the operator" in config.read_text()
    assert (root / "etc/qmpfd/qmpfd.toml.dist").read_text() == \
        (ROOT / "config/qmpfd.toml").read_text()

    run(ROOT / "scripts/uninstall", "--root", root)
    assert not (root / "opt/qmpfd").exists()
    assert not (units / "qmpfd.service").exists() and not (units / "qmpfd.socket").exists()
    assert not (units / "sockets.target.wants/qmpfd.socket").exists()
    assert not (share / "man/man8/qmpfd.8").exists()
    assert "# edited by the operator" in config.read_text(), "uninstall keeps the config"
    run(ROOT / "scripts/uninstall", "--root", root, "--purge")
    assert not (root / "etc/qmpfd").exists()
