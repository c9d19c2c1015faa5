"""Rehearsal helper: link into DEST the venv's distributions that the device image lists
(scripts/device_image_packages.txt), so a bare venv whose .pth names DEST stands in for the
image; docs/gpu_check.md says how the server wheelhouse was rehearsed with it."""
import importlib.metadata as md, os, re, sys
from pathlib import Path
norm = lambda n: re.sub(r"[-_.]+", "-", n.lower())
have = {norm(l.strip()) for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")}
dest = Path(sys.argv[2]); dest.mkdir(parents=True, exist_ok=True)
n = 0
for dist in md.distributions():
    if norm(dist.metadata["Name"]) not in have:
        continue
    base = Path(dist._path).parent
    tops = {Path(f).parts[0] for f in (dist.files or []) if not str(f).startswith("..")}
    for t in tops:
        src, dst = base / t, dest / t
        if src.exists() and not dst.exists():
            os.symlink(src, dst); n += 1
print(f"{n} entries linked into {dest}")
