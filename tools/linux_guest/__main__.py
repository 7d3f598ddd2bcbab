"""``python -m tools.linux_guest``: build the guest (or find it cached) and print its paths."""

from __future__ import annotations

from tools.linux_guest.build import build


def main() -> None:
    image = build(verbose=True)
    how = (f"built in {image.built_seconds:.1f} s" if image.built_seconds is not None
           else "cached")
    print(f"kernel:  {image.kernel}  ({image.kernel_version})")
    print(f"initrd:  {image.initrd}  ({image.initrd_size / 2**20:.1f} MiB, {how})")
    print("packages: " + ", ".join(f"{p} {v}" for p, v in image.packages.items()))


if __name__ == "__main__":
    main()
