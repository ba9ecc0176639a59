"""Man pages for qmpfd(8), qmpfctl(1) and qmpfd.toml(5), generated from the argument parsers
(argparse-manpage) and from the config models, so they cannot drift from the code.

    python scripts/manpages.py OUTDIR
"""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from qmpfd import __version__
from qmpfd.config import config_sections

ROOT = Path(__file__).resolve().parents[1]
URL = "https://github.com/qmpfd/qmpfd"


def argparse_page(out: Path, module: str, prog: str, section: str, description: str) -> None:
    tool = Path(sys.executable).with_name("argparse-manpage")
    subprocess.run([str(tool), "--module", module,
                    "--function", "build_parser", "--prog", prog, "--project-name", "qmpfd",
                    "--version", __version__, "--description", description, "--url", URL,
                    "--manual-section", section, "--manual-title", "qmpfd manual",
                    "--output", str(out)], check=True)


def _esc(text: str) -> str:
    return text.replace("\\", "\\e").replace("-", "\\-")


def _kind(annotation: Any) -> str:
    """A TOML reader's name for a Python annotation: string, integer, path, list of ..."""
    text = str(annotation)
    for old, new in (("typing.", ""), ("pathlib.", ""), ("<class '", ""), ("'>", ""),
                     ("Path", "path"), ("str", "string"), ("int", "integer"),
                     ("float", "seconds"), ("bool", "boolean"), (" | None", " (optional)"),
                     ("Literal", "one of ")):
        text = text.replace(old, new)
    return text


def _default(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if name == "socket_mode" and isinstance(value, int):
        return f"0{value:o}"
    return "unset" if value is None else str(value)


def config_page(out: Path) -> None:
    """qmpfd.toml(5): every section and key, its type and default, then the annotated
    example config shipped with qmpfd."""
    lines = [f'.TH QMPFD.TOML 5 "{date.today():%Y-%m-%d}" "qmpfd {__version__}" "qmpfd manual"',
             ".SH NAME", "qmpfd.toml \\- configuration of the qmpfd daemon",
             ".SH DESCRIPTION",
             "TOML. Unknown keys are errors naming the key. \\fBsystemctl reload qmpfd\\fR "
             "(SIGHUP) re-reads the file: log level and format and the access section apply "
             "at once; a file that does not load is refused and the running config kept.",
             ".SH SECTIONS AND KEYS"]
    for title, inner in config_sections():
        lines += [".SS " + _esc(title)]
        if inner.__doc__:
            lines.append(_esc(" ".join(inner.__doc__.split())))
        for name, f in inner.model_fields.items():
            key = f.alias or name
            kind = _kind(f.annotation)
            lines += [".TP", f"\\fB{_esc(key)}\\fR ({_esc(kind)})",
                      f"default: {_esc(_default(inner, name))}"]
    example = (ROOT / "config" / "qmpfd.toml").read_text()
    lines += [".SH EXAMPLE", ".nf", _esc(example), ".fi",
              ".SH SEE ALSO", "qmpfd(8), qmpfctl(1)"]
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    outdir = Path(sys.argv[1])
    for section in ("1", "5", "8"):
        (outdir / f"man{section}").mkdir(parents=True, exist_ok=True)
    argparse_page(outdir / "man8" / "qmpfd.8", "qmpfd.daemon", "qmpfd", "8",
                  "multifunction PCI hotplug for QEMU VMs over QMP (the daemon)")
    argparse_page(outdir / "man1" / "qmpfctl.1", "qmpfd.cli.parser", "qmpfctl", "1",
                  "client of the qmpfd daemon")
    config_page(outdir / "man5" / "qmpfd.toml.5")


if __name__ == "__main__":
    main()
