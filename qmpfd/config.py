"""Daemon configuration: a TOML file read into pydantic models.

Every field has a default, so qmpfd runs with no file at all; command-line flags override the file
(see :mod:`qmpfd.daemon`). Unknown keys are refused so that a typo in a hypervisor's config is an
error at start-up, not a silently ignored setting.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qmpfd import eventloop
from qmpfd.errors import InvalidRequest

VM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

Seconds = Annotated[float, Field(gt=0, le=3600)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DaemonConfig(_Strict):
    #: the API socket (under socket activation, systemd's qmpfd.socket decides)
    socket: Path = Path("/run/qmpfd/qmpfd.sock")
    #: its mode (octal; "0660" as a string too)
    socket_mode: int = Field(0o660, alias="socket-mode")
    #: the group owning the socket (default: qmpfd's own group)
    socket_group: str | None = Field(None, alias="socket-group")
    #: the journal, the audit log and the lock
    state_dir: Path = Field(Path("/var/lib/qmpfd"), alias="state-dir")
    #: debug, info, warning, error or critical
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", alias="log-level")
    #: json (one object per line, for journald) or text
    log_format: str = Field("json", alias="log-format", pattern="^(json|text)$")
    #: API sessions at once (tenants together never take the last eighth)
    max_clients: int = Field(64, alias="max-clients", ge=1, le=4096)
    #: the longest request accepted, in bytes
    max_line_bytes: int = Field(1 << 20, alias="max-line-bytes", ge=1024, le=64 << 20)
    #: events kept for query-events {since} (a reconnecting client replays what it missed)
    event_ring: int = Field(4096, alias="event-ring", ge=16, le=1 << 20)
    #: the event loop: auto (uvloop when installed, else Python's own), uvloop, or asyncio
    event_loop: eventloop.Choice = Field("auto", alias="event-loop")

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, v: object) -> object:
        # TOML has no octal strings for modes people write as "0660"; accept both forms.
        if isinstance(v, str):
            return int(v, 8)
        return v


class PolicyTimeouts(_Strict):
    """Per-policy overrides; unset fields keep the policy's own default."""

    #: seconds from the first device_del to the last DEVICE_DELETED
    unplug: Seconds | None = None
    #: seconds for each device_add
    plug: Seconds | None = None
    #: seconds a slot emptied on this mechanism is kept from new devices (see the policy)
    reuse_delay: Annotated[float, Field(ge=0, le=60)] | None = Field(None, alias="reuse-delay")
    #: false only to measure what the unplug gate prevents (qmpfd.qemu.gate)
    serial_unplug: bool | None = Field(None, alias="serial-unplug")


class TimeoutConfig(_Strict):
    #: seconds to connect to a VM's QMP socket
    qmp_connect: Seconds = Field(5.0, alias="qmp-connect")
    #: seconds for any other QMP command
    command: Seconds = 30.0
    #: seconds for a whole attach
    attach: Seconds = 60.0
    #: seconds a queued function (function-add) waits for function 0
    pending_expiry: Seconds = Field(300.0, alias="pending-expiry")
    #: per-policy overrides: [timeouts.policy.acpi-pcihp], .pcie-native, .spapr
    policy: dict[str, PolicyTimeouts] = Field(default_factory=dict)


class TenantRule(_Strict):
    """A group whose members may act only on the VMs whose names match ``vms`` (shell-style
    patterns: ``a-*``): a tenant on its own VMs. Host devices and raw QMP stay with full access."""

    group: str | int
    vms: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(min_length=1)
    #: where its members may adopt QEMU sockets (below the global qmp-dirs too); none if empty
    qmp_dirs: list[Path] = Field(default_factory=list, alias="qmp-dirs")
    #: API sessions its members may hold at once (full-access peers always keep room)
    sessions: int = Field(8, ge=1, le=1024)
    #: requests its members may have in flight at once (a slow attach counts until it ends)
    requests: int = Field(16, ge=1, le=4096)


class AccessConfig(_Strict):
    """Who may use the API socket and what they may point qmpfd at."""

    #: Peers (SO_PEERCRED) allowed by user name or uid, and by group (primary or supplementary).
    users: list[str | int] = Field(default_factory=lambda: list[str | int](["root"]))
    #: groups (names or gids) whose members may use the API with full access
    groups: list[str | int] = Field(default_factory=lambda: list[str | int](["qmpfd"]))
    #: vm-add only accepts QMP sockets below these directories (after resolving symlinks).
    qmp_dirs: list[Path] = Field(
        default_factory=lambda: [Path("/run/qemu"), Path("/var/lib/qemu"),
                                 Path("/run/libvirt/qemu"), Path("/var/lib/libvirt/qemu")],
        alias="qmp-dirs")
    #: vm-qmp (raw QMP commands to a VM) bypasses every check qmpfd makes: off unless enabled.
    qmp_passthrough: bool = Field(False, alias="qmp-passthrough")
    #: Audit log of state-changing requests (JSON lines); default: STATE_DIR/audit.log.
    audit_log: Path | None = Field(None, alias="audit-log")
    #: Groups limited to some VMs ([[access.tenants]] group = "...", vms = ["pattern", ...]).
    tenants: list[TenantRule] = Field(default_factory=list)


class DenyEntry(_Strict):
    """A host function nobody may assign: by class prefix or vendor:device, with the reason."""

    reason: str = Field(min_length=1)
    class_prefix: str | None = Field(None, alias="class", pattern=r"^(0x)?[0-9a-fA-F]{2,6}$")
    vendor_device: str | None = Field(None, alias="vendor-device",
                                      pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")


class HostConfig(_Strict):
    #: where sysfs is mounted (tests point it at a captured tree)
    sysfs: Path = Path("/sys")
    #: where procfs is mounted
    proc: Path = Path("/proc")
    #: Let a request with "force" take a function the host is using (interface up, mounted disk).
    allow_force: bool = Field(False, alias="allow-force")
    #: host functions nobody may assign ([[host.deny]] class or vendor-device, and a reason)
    deny: list[DenyEntry] = Field(default_factory=list)


class MetricsConfig(_Strict):
    """The optional Prometheus/OpenMetrics listener: ``unix:/run/qmpfd/metrics.sock`` or a
    loopback ``127.0.0.1:9477`` / ``[::1]:9477``. Off (None) by default."""

    #: unix:/path, or a loopback HOST:PORT
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _local_only(cls, v: str | None) -> str | None:
        if v is None or v.startswith("unix:/"):
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or host.strip("[]") not in ("127.0.0.1", "::1",
                                                                      "localhost"):
            raise ValueError("a Unix socket (unix:/path) or a loopback HOST:PORT "
                             "(127.0.0.1:9477, [::1]:9477)")
        return v


class VmEntry(_Strict):
    """A VM adopted at start-up, as by vm-add (not fatal if it is not running)."""

    #: its name in qmpfd
    name: str = Field(pattern=VM_NAME_PATTERN)
    #: its QMP socket
    qmp: Path


class Config(_Strict):
    daemon: DaemonConfig = Field(default_factory=lambda: DaemonConfig())
    timeouts: TimeoutConfig = Field(default_factory=lambda: TimeoutConfig())
    access: AccessConfig = Field(default_factory=lambda: AccessConfig())
    host: HostConfig = Field(default_factory=lambda: HostConfig())
    metrics: MetricsConfig = Field(default_factory=lambda: MetricsConfig())
    vm: list[VmEntry] = Field(default_factory=list)


def load_config(path: Path | None) -> Config:
    """Read ``path`` (or return defaults); errors name the file and the offending key."""
    if path is None:
        return Config()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidRequest(f"config {path}: {exc}") from exc
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"config {path}: {where}: {first['msg']}") from exc


#: What a reload applies to the running daemon (everything else waits for a restart).
APPLIED_ON_RELOAD = frozenset({"daemon.log-level", "daemon.log-format", "access.users",
                               "access.groups", "access.qmp-dirs", "access.qmp-passthrough",
                               "access.tenants"})


def needs_restart(running: Config, new: Config) -> list[str]:
    """The settings (``section.key`` as written in the file) that differ between the running
    config and a reloaded one and that only a restart applies."""
    old_doc = running.model_dump(mode="json", by_alias=True)
    new_doc = new.model_dump(mode="json", by_alias=True)
    changed = []
    for section in sorted(old_doc.keys() | new_doc.keys()):
        old_part, new_part = old_doc.get(section), new_doc.get(section)
        if not isinstance(old_part, dict) or not isinstance(new_part, dict):
            if old_part != new_part:
                changed.append(section)
            continue
        changed += [f"{section}.{key}" for key in sorted(old_part.keys() | new_part.keys())
                    if old_part.get(key) != new_part.get(key)]
    return [key for key in changed if key not in APPLIED_ON_RELOAD]


def config_sections() -> list[tuple[str, type[BaseModel]]]:
    """Every section of the config file as its TOML heading (``[daemon]``, ``[[vm]]``) and its
    model, in file order: what the man page and the config reference document."""
    out: list[tuple[str, type[BaseModel]]] = []
    for section, field in Config.model_fields.items():
        model: Any = field.annotation
        inner: Any = getattr(model, "__args__", (model,))[0] if section == "vm" else model
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            out.append((f"[[{section}]]" if section == "vm" else f"[{section}]", inner))
    return out
