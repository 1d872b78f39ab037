"""Build a venv that sees only some of this venv's distributions (to find what an offline machine lacks).

``python scripts/hide_absent_venv.py DEST --allow-pip-list gpu_pip_list.txt --allow axolotl fire ...``

Creates the virtual environment ``DEST`` (same Python, no pip) whose site-packages holds symlinks
to the files of the allowed distributions of the running interpreter's site-packages only: those
named in a ``pip list`` file (the other machine's packages), those given with ``--allow``, and
nothing else (not this repository's editable install: put the repository root and ``kernels``
on PYTHONPATH, as on the other machine). Every other distribution is absent: imports
fail, ``importlib.util.find_spec`` says None and ``importlib.metadata`` does not know it, as on the
other machine (a meta-path finder hides imports but not metadata, which transformers and Axolotl
also probe). A top-level folder shared by several distributions (``google``) is linked file by
file so that only the allowed ones' files appear. Re-running replaces ``DEST``'s site-packages.
"""

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pip_list(path: str) -> set[str]:
    """Names from ``pip list`` output (header lines skipped) or a requirements-style list."""
    names = set()
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("Package", "---", "#")):
            continue
        names.add(norm(re.split(r"[\s=<>!~\[;]", line, maxsplit=1)[0]))
    return names


def main(argv=None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="venv folder to (re)create")
    parser.add_argument("--allow-pip-list", action="append", default=[], help="pip list output of the other machine")
    parser.add_argument("--allow", nargs="*", default=[], help="extra distributions to keep (the carried wheels)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    allowed = {norm(n) for n in args.allow}
    for path in args.allow_pip_list:
        allowed |= read_pip_list(path)
    src = Path(sysconfig.get_paths()["purelib"]).resolve()
    dest = Path(args.dest).resolve()
    if not (dest / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([dest / "bin" / "python", "-c", query], text=True).strip())
    shutil.rmtree(site)
    site.mkdir(parents=True)

    owners: dict[str, set[str]] = {}  # top-level entry -> distributions with files under it
    files: dict[str, list[str]] = {}  # distribution -> its files (relative to site-packages)
    kept, hidden = [], []
    for dist in md.distributions(path=[str(src)]):
        name = norm(dist.metadata["Name"])
        rel = [str(f) for f in dist.files or [] if not str(f).startswith("..")]
        files[name] = rel
        for f in rel:
            owners.setdefault(f.split("/", 1)[0], set()).add(name)
        (kept if name in allowed else hidden).append(name)
    for top, dists in sorted(owners.items()):
        if not dists & allowed or top == "__pycache__":
            continue
        if dists <= allowed:
            (site / top).symlink_to(src / top)
            continue
        for name in sorted(dists & allowed):  # shared folder: link the allowed files one by one
            for f in files[name]:
                if f.split("/", 1)[0] == top and (src / f).exists():
                    (site / f).parent.mkdir(parents=True, exist_ok=True)
                    if not (site / f).exists():
                        (site / f).symlink_to(src / f)
    print(f"{dest}: kept {len(kept)} distributions, hid {len(hidden)}")
    if args.verbose:
        print("hidden:", " ".join(sorted(hidden)))
    missing = sorted(allowed - set(kept))
    if args.verbose:
        print("allowed but not in this venv:", " ".join(missing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
