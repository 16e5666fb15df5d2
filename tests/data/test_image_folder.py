"""The image-folder reader and CIFAR-10 from a local tree (no network)."""

from __future__ import annotations

import pytest
import torch
from torchvision.io import write_png

from lightning_nfk.data import CIFAR10DataModule
from lightning_nfk.data.image_folder import read_image_folder
from lightning_nfk.data.torchvision_sets import CIFAR10_CLASSES
from tests.helpers.data import write_image_tree as _tree


def test_reads_classes_in_sorted_order_and_files_in_sorted_order(tmp_path):
    written = _tree(tmp_path, {"dog": 2, "cat": 3})
    images, labels, classes = read_image_folder(tmp_path, shape=(3, 32, 32))
    assert classes == ("cat", "dog")
    assert labels.tolist() == [0, 0, 0, 1, 1]
    expected = [
        written[tmp_path / c / f"{i:03d}.png"]
        for c, n in (("cat", 3), ("dog", 2))
        for i in range(n)
    ]
    assert torch.equal(images, torch.stack(expected))  # PNG: lossless


def test_refuses_other_classes_shapes_and_empty_folders(tmp_path):
    _tree(tmp_path / "a", {"cat": 1, "dog": 1})
    with pytest.raises(ValueError, match=r"one folder per class, \['cat', 'dog', 'frog'\]"):
        read_image_folder(tmp_path / "a", classes=("cat", "dog", "frog"))
    _tree(tmp_path / "b", {"cat": 1}, shape=(3, 28, 28))
    with pytest.raises(ValueError, match=r"\(3, 28, 28\).*every image must be \(3, 32, 32\)"):
        read_image_folder(tmp_path / "b", shape=(3, 32, 32))
    (tmp_path / "c" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"No .* images"):
        read_image_folder(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="No image folder"):
        read_image_folder(tmp_path / "missing")


def test_cifar10_data_module_reads_a_tree(tmp_path):
    train = _tree(tmp_path / "train", dict.fromkeys(CIFAR10_CLASSES, 3), seed=1)
    _tree(tmp_path / "test", dict.fromkeys(CIFAR10_CLASSES, 1), seed=2)
    dm = CIFAR10DataModule(str(tmp_path), val_size=5, normalization="none", with_index=True)
    dm.prepare_data()
    dm.setup()
    assert len(dm.dataset("train")) == 25 and len(dm.dataset("val")) == 5
    assert len(dm.dataset("test")) == 10
    _, y, i = dm.dataset("test")[4]  # test files: class order, one per class
    assert int(y) == 4 and int(i) == 4
    image = train[tmp_path / "train" / "airplane" / "000.png"]
    stacked = torch.stack(
        [dm.dataset(s)[j][0] for s in ("train", "val") for j in range(len(dm.dataset(s)))]
    )
    assert (stacked * 255).round().to(torch.uint8).eq(image).flatten(1).all(1).any()


def test_cifar10_without_tree_or_network_says_both_ways(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match=r"image-folder tree.*\n.*torchvision download"):
        CIFAR10DataModule(str(tmp_path)).setup()


# Bad input: every decode error names the file, what is wrong and the cure; junk is skipped.


def _png16(array) -> bytes:
    """A 16-bit PNG written by hand (encode_png takes uint8 only): array (H, W, C) of
    values < 65536, C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)."""
    import struct
    import zlib

    array = torch.as_tensor(array, dtype=torch.int64)
    h, w, c = array.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(
        b"\x00" + b"".join(int(v).to_bytes(2, "big") for v in array[y].flatten()) for y in range(h)
    )
    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _to_8_bits(values: torch.Tensor) -> torch.Tensor:
    """round(v * 255 / 65535), in float64 (no ties: v / 257 is never k + 1/2)."""
    return (values.to(torch.float64) * 255 / 65535).round().to(torch.uint8)


def _jpeg_bytes(shape=(3, 32, 32), seed=0) -> bytes:
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return encode_jpeg(image).numpy().tobytes()


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("001.jpg", "truncated", r"truncated or corrupt"),
        ("001.jpg", b"<html><body>404 Not Found</body></html>", r"not a JPEG, PNG, WebP or GIF"),
        ("001.png", "truncated", r"truncated or corrupt"),
    ],
)
def test_a_file_that_does_not_decode_is_named_with_the_cure(tmp_path, name, content, what):
    _tree(tmp_path, {"cat": 2, "dog": 2})
    path = tmp_path / "dog" / name
    if content == "truncated":
        if name.endswith(".jpg"):
            whole = _jpeg_bytes()
        else:
            whole = (tmp_path / "cat" / "000.png").read_bytes()
        content = whole[: len(whole) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"(?s)Cannot decode .*" + what + r".*To fix") as info:
        read_image_folder(tmp_path, shape=(3, 32, 32))
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)  # torchvision's own error, chained


def test_empty_files_are_refused_before_decoding_naming_them(tmp_path, monkeypatch):
    import torchvision.io

    _tree(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "cat" / "zero.jpg").write_bytes(b"")
    (tmp_path / "dog" / "zero.png").write_bytes(b"")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the cheap checks")

    monkeypatch.setattr(torchvision.io, "decode_image", no_decoding)
    with pytest.raises(ValueError, match=r"(?s)2 empty .*zero\.jpg.*zero\.png.*re-copy"):
        read_image_folder(tmp_path, shape=(3, 32, 32))


def test_hidden_files_and_os_junk_are_skipped_silently(tmp_path, recwarn):
    written = _tree(tmp_path, {"cat": 2, "dog": 1})
    # macOS: AppleDouble ("._" + name, resource-fork metadata, not an image) and .DS_Store
    (tmp_path / "cat" / "._000.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "dog" / ".hidden.jpg").write_bytes(b"not an image")
    (tmp_path / "dog" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")  # Windows
    (tmp_path / "dog" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are no classes
    (tmp_path / "__MACOSX" / "cat").mkdir(parents=True)  # a macOS zip's metadata folder
    images, labels, classes = read_image_folder(tmp_path, ("cat", "dog"), (3, 32, 32))
    assert classes == ("cat", "dog") and labels.tolist() == [0, 0, 1]
    assert torch.equal(images[2], written[tmp_path / "dog" / "000.png"])
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_webp_and_gif_are_read(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    written = _tree(tmp_path, {"cat": 1})
    original = written[tmp_path / "cat" / "000.png"]
    still = Image.fromarray(original.permute(1, 2, 0).numpy())
    still.save(tmp_path / "cat" / "001.webp", lossless=True)
    still.convert("L").save(tmp_path / "cat" / "002.GIF")  # grey: the palette is exact
    images, labels, _ = read_image_folder(tmp_path, shape=(3, 32, 32))
    assert len(images) == 3 and labels.tolist() == [0, 0, 0]
    assert torch.equal(images[1], original)  # lossless WebP
    grey = torch.from_numpy(__import__("numpy").asarray(still.convert("L")))
    assert torch.equal(images[2], grey.expand(3, -1, -1))


def test_an_animated_gif_is_refused_naming_it(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    _tree(tmp_path, {"cat": 1})
    frames = [Image.new("RGB", (32, 32), (i * 80, 0, 0)) for i in range(3)]
    path = tmp_path / "cat" / "moving.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match=r"(?s)moving\.gif.*3 frames.*one image per file"):
        read_image_folder(tmp_path, shape=(3, 32, 32))


def test_formats_torchvision_cannot_decode_are_refused_in_one_error(tmp_path, monkeypatch):
    import torchvision.io

    _tree(tmp_path, {"cat": 1, "dog": 1})
    for i in range(7):
        (tmp_path / "cat" / f"{i:03d}.bmp").write_bytes(b"BM" + bytes(60))
    (tmp_path / "dog" / "scan.TIFF").write_bytes(b"II*\x00" + bytes(60))
    (tmp_path / "dog" / "photo.heic").write_bytes(bytes(64))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the cheap checks")

    monkeypatch.setattr(torchvision.io, "decode_image", no_decoding)
    with pytest.raises(ValueError, match=r"(?s)9 files .*cannot decode.*convert") as info:
        read_image_folder(tmp_path, shape=(3, 32, 32))
    message = str(info.value)
    assert str(tmp_path / "cat" / "000.bmp") in message and "and 6 more" in message
    assert str(tmp_path / "cat" / "006.bmp") not in message  # a few, not all
    assert "7 .bmp, 1 .heic, 1 .tiff" in message  # every format, counted


def test_a_class_of_only_unreadable_formats_says_convert_not_empty(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "0.bmp").write_bytes(b"BM" + bytes(60))
    with pytest.raises(ValueError, match=r"convert"):
        read_image_folder(tmp_path)


def test_other_files_are_skipped_with_one_warning_naming_an_example(tmp_path):
    written = _tree(tmp_path, {"cat": 1, "dog": 1})
    (tmp_path / "cat" / "labels.csv").write_text("file,label\n")
    (tmp_path / "dog" / "notes.txt").write_text("from the web\n")
    (tmp_path / "dog" / "more").mkdir()  # sub-folders are not searched
    with pytest.warns(UserWarning, match=r"(?s)3 entries .*not read.*labels\.csv") as record:
        images, labels, _ = read_image_folder(tmp_path, shape=(3, 32, 32))
    assert len([w for w in record if w.category is UserWarning]) == 1
    assert labels.tolist() == [0, 1]
    assert torch.equal(images[1], written[tmp_path / "dog" / "000.png"])
    (tmp_path / "fish").mkdir()
    (tmp_path / "fish" / "README").write_text("no images yet\n")
    with pytest.raises(FileNotFoundError, match=r"(?s)No .* images in .*fish.*README"):
        read_image_folder(tmp_path)


@pytest.mark.parametrize(
    ("channels", "shape"),
    [(1, (1, 4, 3)), (1, (3, 4, 3)), (3, (3, 4, 3)), (4, (3, 4, 3)), (2, (1, 4, 3))],
)
def test_16_bit_pngs_are_converted_to_8_bits(tmp_path, channels, shape):
    g = torch.Generator().manual_seed(channels)
    values = torch.randint(0, 65536, (4, 3, channels), generator=g)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "deep.png").write_bytes(_png16(values))
    write_png(torch.zeros(shape, dtype=torch.uint8), str(tmp_path / "cat" / "flat.png"))
    images, _, _ = read_image_folder(tmp_path, shape=shape)
    assert images.dtype == torch.uint8 and images.shape == (2, *shape)
    expected = _to_8_bits(values.permute(2, 0, 1))  # (C, H, W)
    if shape[0] == channels or (channels == 4 and shape[0] == 3):
        assert torch.equal(images[0], expected[: shape[0]])  # RGB(A) -> RGB drops alpha
    elif channels == 1:
        assert torch.equal(images[0], expected.expand(shape[0], -1, -1))  # grey -> RGB
    else:  # grey + alpha -> grey
        assert torch.equal(images[0], expected[:1])


def test_16_bit_to_8_bit_mapping_rounds_every_value(tmp_path):
    every = torch.arange(65536).reshape(256, 256, 1)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "all.png").write_bytes(_png16(every))
    images, _, _ = read_image_folder(tmp_path)  # UNCHANGED: one grey channel
    assert images.dtype == torch.uint8 and images.shape == (1, 1, 256, 256)
    got = images.flatten()
    assert torch.equal(got, _to_8_bits(every.flatten()))
    assert got[0] == 0 and got[-1] == 255 and got[128] == 0 and got[129] == 1  # 128/257 < 1/2
    assert torch.equal(got[::257], torch.arange(256, dtype=torch.uint8))  # 257 k -> k


def test_images_of_different_shapes_without_shape_are_refused_naming_both(tmp_path):
    _tree(tmp_path, {"cat": 1})
    _tree(tmp_path, {"dog": 1}, shape=(1, 32, 32))
    with pytest.raises(ValueError, match=r"(?s)dog.*000\.png.*\(1, 32, 32\).*cat.*\(3, 32, 32\)"):
        read_image_folder(tmp_path)


@pytest.mark.parametrize("present", ["train", "test"])
def test_cifar10_with_one_split_folder_names_the_missing_one(tmp_path, monkeypatch, present):
    import torchvision.datasets

    def no_download(*args, **kwargs):
        raise AssertionError("tried torchvision's download")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    _tree(tmp_path / present, dict.fromkeys(CIFAR10_CLASSES, 1))
    missing = "test" if present == "train" else "train"
    dm = CIFAR10DataModule(str(tmp_path), val_size=2)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError, match=r"(?s)Incomplete image-folder tree") as info:
            step()
        assert f"{str(tmp_path / missing)!r} is missing" in str(info.value)
        assert f"{str(tmp_path / present)!r}" in str(info.value)  # how to go back to a download


def test_cifar10_split_folder_without_class_folders_is_named(tmp_path):
    _tree(tmp_path / "train", dict.fromkeys(CIFAR10_CLASSES, 1))
    (tmp_path / "test" / ".ipynb_checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"'[^']*test' holds no class folders"):
        CIFAR10DataModule(str(tmp_path), val_size=2).setup()
