"""Vendor, device and class names from pci.ids (Debian package ``pci.ids``).

The file format: a vendor line ``vvvv  Name``, device lines indented by one tab, subsystem lines by
two; after ``C cc  Class name`` lines, subclasses indented by one tab. Parsed once, lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATHS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))


@dataclass
class PciIds:
    vendors: dict[int, str] = field(default_factory=dict)
    devices: dict[tuple[int, int], str] = field(default_factory=dict)
    classes: dict[int, str] = field(default_factory=dict)       # class << 8 | subclass
    base_classes: dict[int, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> PciIds:
        ids = cls()
        vendor: int | None = None
        klass: int | None = None
        for raw in text.splitlines():
            if not raw or raw.startswith("#"):
                continue
            if raw.startswith("C "):
                code, _, name = raw[2:].partition("  ")
                klass, vendor = int(code, 16), None
                ids.base_classes[klass] = name.strip()
            elif raw.startswith("\t\t"):
                continue  # subsystems and programming interfaces: not needed
            elif raw.startswith("\t"):
                code, _, name = raw[1:].partition("  ")
                if vendor is not None:
                    ids.devices[(vendor, int(code, 16))] = name.strip()
                elif klass is not None:
                    ids.classes[klass << 8 | int(code, 16)] = name.strip()
            else:
                code, _, name = raw.partition("  ")
                try:
                    vendor, klass = int(code, 16), None
                except ValueError:
                    vendor = None
                    continue
                ids.vendors[vendor] = name.strip()
        return ids

    @classmethod
    def load(cls, paths: tuple[Path, ...] = DEFAULT_PATHS) -> PciIds:
        for p in paths:
            if p.exists():
                return cls.parse(p.read_text(errors="replace"))
        return cls()  # names are a convenience: without the file, ids are shown bare

    def vendor(self, vendor: int) -> str | None:
        return self.vendors.get(vendor)

    def device(self, vendor: int, device: int) -> str | None:
        return self.devices.get((vendor, device))

    def class_name(self, class_code: int) -> str | None:
        """``class_code`` as in sysfs (0xCCSSPP)."""
        return self.classes.get(class_code >> 8) or self.base_classes.get(class_code >> 16)
