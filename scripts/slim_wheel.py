"""Repack a wheel without the files a run never loads, so it fits the GPU check's 64 MiB carry.

    python scripts/slim_wheel.py WHEEL NOTE_FILE --drop GLOB [--drop GLOB ...] [--keep GLOB ...]

A file is dropped when it matches a --drop glob (fnmatch: '*' also crosses '/') and no --keep
glob.  RECORD is rewritten without the dropped files, so pip installs the result cleanly; the wheel
is replaced in place and one line saying what went is appended to NOTE_FILE (SLIMMED.txt).
"""

from __future__ import annotations

import argparse
import fnmatch
import zipfile
from pathlib import Path


def slim(whl: Path, drop: list[str], keep: list[str]) -> tuple[int, int]:
    def dropped(name: str) -> bool:
        return (any(fnmatch.fnmatchcase(name, g) for g in drop)
                and not any(fnmatch.fnmatchcase(name, g) for g in keep))

    out = whl.with_suffix(".slim")
    n_drop = n_keep = 0
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        names = {i.filename for i in src.infolist() if not dropped(i.filename)}
        for info in src.infolist():
            if info.filename not in names:
                n_drop += 1
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = [r for r in data.decode().splitlines() if r.split(",", 1)[0] in names]
                data = ("\n".join(rows) + "\n").encode()
            n_keep += 1
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    out.replace(whl)
    return n_drop, n_keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("note", type=Path)
    ap.add_argument("--drop", action="append", required=True)
    ap.add_argument("--keep", action="append", default=[])
    args = ap.parse_args()
    before = args.wheel.stat().st_size
    n_drop, n_keep = slim(args.wheel, args.drop, args.keep)
    after = args.wheel.stat().st_size
    line = (f"{args.wheel.name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, {n_drop} files dropped "
            f"(--drop {' '.join(args.drop)}{' --keep ' + ' '.join(args.keep) if args.keep else ''}), "
            f"{n_keep} kept; everything else is the PyPI wheel's")
    with args.note.open("a") as f:
        f.write(line + "\n")
    print(f"[wheelhouse] slimmed {line}")


if __name__ == "__main__":
    main()
