"""A tiny guest that writes to two IDE disks from a vCPU (see writer.S)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("writer.S")


def build_boot_image(workdir: Path) -> Path:
    """Assemble writer.S into a 1 MiB raw disk image whose first sector boots."""
    obj, binary, image = workdir / "writer.o", workdir / "writer.bin", workdir / "writer.img"
    subprocess.run(["as", "--32", "-o", str(obj), str(SOURCE)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary",
                    "-o", str(binary), str(obj)], check=True)
    data = binary.read_bytes()
    assert len(data) == 512 and data[-2:] == b"\x55\xaa", "boot sector must be 512 bytes"
    image.write_bytes(data + b"\0" * (1024 * 1024 - 512))
    return image
