"""Fashion-MNIST for the lottery-ticket benchmark: the Debian package reader, the idx reader and
the loader (against numpy / dpkg-deb references), and a small LotteryTicket run on real images."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from slimforge.data import fashion_mnist
from slimforge.data.assets import FASHION_MNIST_DEB, deb_members, fashion_mnist_files, read_idx
from slimforge.prune import LotteryTicket, apply_masks


def idx_bytes(shape: tuple[int, ...], data: bytes) -> bytes:
    head = bytes([0, 0, 0x08, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
    return head + data


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_read_idx_matches_numpy(tmp_path_factory, shape, gz, seed) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    raw = idx_bytes(shape, arr.tobytes())
    path = tmp_path_factory.mktemp("idx") / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    got_shape, data = read_idx(path)
    assert got_shape == shape
    np.testing.assert_array_equal(np.frombuffer(data, np.uint8).reshape(shape), arr)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0")  # float32 type code
    with pytest.raises(ValueError, match="unsigned bytes"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(idx_bytes((3, 2), b"\1" * 5))
    with pytest.raises(ValueError, match="header says 6"):
        read_idx(short)


def make_deb(path: Path, files: dict[str, bytes]) -> None:
    """A minimal Debian package (ar: debian-binary, control.tar.xz, data.tar.xz)."""

    def tar_xz(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    control = b"Package: t\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", tar_xz({"./control": control})),
        ("data.tar.xz", tar_xz({f"./{k}": v for k, v in files.items()})),
    ]
    out = b"!<arch>\n"
    for name, data in members:
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += head + data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(out)


def test_deb_members_extracts_like_dpkg_deb(tmp_path: Path) -> None:
    files = {"usr/share/x/a.bin": b"odd", "usr/share/x/b.bin": bytes(range(256)) * 3}
    deb = tmp_path / "t.deb"
    make_deb(deb, files)
    deb_members(deb, {k: tmp_path / "out" / Path(k).name for k in files})
    for k, v in files.items():
        assert (tmp_path / "out" / Path(k).name).read_bytes() == v
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "ref")], check=True)
        for k in files:
            assert (tmp_path / "ref" / k).read_bytes() == (
                tmp_path / "out" / Path(k).name
            ).read_bytes()
    with pytest.raises(KeyError, match="missing.bin"):
        deb_members(deb, {"usr/share/x/missing.bin": tmp_path / "m"})
    with pytest.raises(ValueError, match="not a Debian package"):
        deb_members(tmp_path / "out" / "a.bin", {})


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("validation", tmp_path)
    with pytest.raises(FileNotFoundError, match="make assets"):
        fashion_mnist_files(tmp_path)


# ---------------------------------------------------------------------------- the real data


@pytest.fixture(scope="module")
def fmnist_assets(assets: Path) -> Path:
    if not (assets / FASHION_MNIST_DEB).exists():
        pytest.skip(f"{assets / FASHION_MNIST_DEB} not fetched")
    return assets


@pytest.mark.assets
def test_fashion_mnist_matches_numpy_reading_of_the_package(fmnist_assets: Path) -> None:
    files = fashion_mnist_files(fmnist_assets)
    for split, prefix, n in (("train", "train", 60_000), ("test", "t10k", 10_000)):
        images, labels = fashion_mnist(split, fmnist_assets)
        assert images.dtype == labels.dtype == torch.uint8
        assert images.shape == (n, 28, 28) and labels.shape == (n,)
        with gzip.open(files[f"{prefix}-images"]) as f:
            ref_x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(n, 28, 28)
        with gzip.open(files[f"{prefix}-labels"]) as f:
            ref_y = np.frombuffer(f.read(), np.uint8, offset=8)
        np.testing.assert_array_equal(images.numpy(), ref_x)
        np.testing.assert_array_equal(labels.numpy(), ref_y)
        # The data set is balanced: 6,000 training and 1,000 test images per class.
        assert labels.bincount().tolist() == [n // 10] * 10
    if shutil.which("dpkg-deb"):  # the extracted files are the package's, byte for byte
        ref = fmnist_assets / "extracted" / "dpkg-ref"
        subprocess.run(
            ["dpkg-deb", "-x", str(fmnist_assets / FASHION_MNIST_DEB), str(ref)], check=True
        )
        try:
            for path in files.values():
                pkg = ref / "usr/share/datasets/fashion-mnist" / path.name
                assert pkg.read_bytes() == path.read_bytes()
        finally:
            shutil.rmtree(ref)


@pytest.mark.assets
def test_lottery_ticket_on_fashion_mnist_subset(fmnist_assets: Path) -> None:
    """Two rounds of LotteryTicket with late rewinding on 2,000 real images: the masks are the
    global magnitude masks of a plain torch reference, pruned weights stay zero, the rewound
    weights are the snapshot's, and the sparse ticket still learns."""
    x, y = fashion_mnist("test", fmnist_assets)  # the smaller file: 2,000 of its images
    x = x[:2000].reshape(2000, -1).float() / 255
    y = y[:2000].long()
    xtr, ytr, xte, yte = x[:1500], y[:1500], x[1500:], y[1500:]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    ticket = LotteryTicket(net, rate=0.2)
    snapshot: dict[str, torch.Tensor] = {}
    trained: list[list[torch.Tensor]] = []

    def train(model: nn.Module) -> float:
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(0)
        for step in range(60):
            if step == 5 and ticket.rounds_done == 0:  # late resetting to iteration 5
                ticket.set_rewind_point()
                snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
            idx = torch.randint(0, len(xtr), (50,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            apply_masks(model)
        trained.append([model[0].weight.detach().clone(), model[2].weight.detach().clone()])
        with torch.no_grad():
            return float((model(xte).argmax(1) == yte).float().mean())

    history = ticket.run(train, rounds=2)
    assert [round(h.sparsity, 2) for h in history] == [0.0, 0.2, 0.36]
    # Reference: global magnitude over both layers' weights of the run before each pruning.
    for r, weights in enumerate(trained[:2], start=1):
        flat = torch.cat([w.abs().reshape(-1) for w in weights])
        k = round((1 - 0.8**r) * flat.numel())
        thr = torch.kthvalue(flat, k).values
        for w, after in zip(weights, trained[r], strict=True):
            # weights pruned before are zeros, the smallest magnitudes: they stay pruned
            assert torch.equal(after != 0, w.abs() > thr)
    masks = [net[0].weight_mask, net[2].weight_mask]
    assert 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks) == pytest.approx(
        0.36, abs=1e-3
    )
    ticket.rewind()
    for name, mod in (("0", net[0]), ("2", net[2])):
        keep = mod.weight_mask
        assert torch.equal(mod.weight[keep], snapshot[f"{name}.weight"][keep])
        assert (mod.weight[~keep] == 0).all()
    # The 36 %-sparse ticket and the dense run both learn (chance is 10 %).
    assert history[0].metric > 0.6 and history[-1].metric > 0.6
