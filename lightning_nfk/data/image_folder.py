"""Read an image-folder tree (``root/<split>/<class>/<file>``) into memory, once.

The layout ``torchvision.datasets.ImageFolder`` reads: one folder per class, classes in
sorted order (their index is their position), files in sorted order within a class.

What is read, skipped or refused (:func:`read_image_folder`):

* read: ``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.gif`` (any case), what
  ``torchvision.io.decode_image`` decodes; 16-bit PNGs are converted to 8 bits
  (``round(v * 255 / 65535)``);
* skipped silently: hidden files and folders (names starting with ``.``: macOS's
  ``._*`` AppleDouble files and ``.DS_Store``, ``.ipynb_checkpoints``, ...) and known OS
  junk (``Thumbs.db``, ``ehthumbs.db``, ``desktop.ini``, a ``__MACOSX`` folder);
* refused, in one error before any decoding: image formats torchvision cannot decode
  (``.bmp``, ``.tif``/``.tiff``, ``.heic``, ...: convert them) and empty (0-byte) files;
* skipped with one warning (how many, and examples): any other file, and sub-folders of
  a class folder (not searched): notes or label files next to the images are common and
  harmless, but a warning keeps a misnamed image from vanishing unnoticed.

A file that does not decode (truncated, corrupt, not an image whatever its name says) is
a ``ValueError`` naming it, what is wrong and the cure, with torchvision's error chained.
"""

from __future__ import annotations

import re
import stat
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

#: The suffixes read (compared lower-case): the formats ``torchvision.io.decode_image``
#: decodes (torchvision 0.29: JPEG, PNG, WebP, GIF; the file's bytes decide, not its name).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
#: Image formats ``decode_image`` cannot decode: refused, with the advice to convert them.
UNSUPPORTED_IMAGE_SUFFIXES = (
    ".bmp",
    ".dib",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".ico",
    ".tga",
    ".avif",
    ".heic",
    ".heif",
    ".jp2",
    ".jxl",
)
#: Names (lower-case) of OS files and folders skipped silently, besides hidden ones.
OS_JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"})

_FORMATS = "JPEG, PNG, WebP or GIF"
_FORMATS_ALL = "JPEG, PNG, WebP and GIF"
_SHOWN = 3  # files named in an error or warning about many


def is_skipped(name: str) -> bool:
    """Whether a file or folder name is skipped silently: hidden (``.*``, which includes
    macOS's ``._*`` AppleDouble files and ``.DS_Store``) or known OS junk."""
    return name.startswith(".") or name.lower() in OS_JUNK_NAMES


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_skipped(p.name))


def find_image_folders(root: str | Path, splits: tuple[str, ...] = ("train", "test")) -> bool:
    """Whether ``root`` holds an image-folder tree, checking that it is complete.

    Returns:
        False when no ``root/<split>/`` folder exists (the caller may use another
        source, e.g. a download); True when every split's folder exists and holds at
        least one class folder.

    Raises:
        FileNotFoundError: a partial tree (some split folder present, another missing or
            without class folders), naming what is missing; a partial tree is taken as
            a tree being set up, never silently replaced by another source.
    """
    root = Path(root)
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        return False
    problems = []
    for s in splits:
        folder = root / s
        if not folder.is_dir():
            kind = " (a file of that name is there)" if folder.exists() else ""
            problems.append(f"{str(folder)!r} is missing{kind}")
        elif not _class_folders(folder):
            problems.append(f"{str(folder)!r} holds no class folders")
    if problems:
        layout = root / ("{" + ",".join(splits) + "}") / "<class>" / "<images>"
        moved = ", ".join(repr(str(root / s)) for s in present)
        raise FileNotFoundError(
            f"Incomplete image-folder tree in {str(root)!r}: {'; '.join(problems)}. "
            f"Every split needs its folder of class folders, {layout}: add what is missing; "
            f"or, to use another source than a tree (e.g. a download), move {moved} out of "
            f"{str(root)!r}."
        )
    return True


def _listed(paths: list[Path]) -> str:
    shown = ", ".join(repr(str(p)) for p in paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def _scan(
    folder: Path, classes: tuple[str, ...]
) -> tuple[list[list[Path]], list[Path], list[Path], list[list[Path]]]:
    """Sort every class folder's entries (no decoding): the images to read per class, the
    files in formats torchvision cannot decode, the empty ones, the others per class."""
    images, unsupported, empty, others = [], [], [], []
    for name in classes:
        read, other = [], []
        for path in sorted((folder / name).iterdir()):
            if is_skipped(path.name):
                continue
            info = path.stat()
            suffix = path.suffix.lower()
            if stat.S_ISDIR(info.st_mode):
                other.append(path)  # sub-folders are not searched
            elif suffix in UNSUPPORTED_IMAGE_SUFFIXES:
                unsupported.append(path)
            elif suffix not in IMAGE_SUFFIXES:
                other.append(path)
            elif info.st_size == 0:
                empty.append(path)
            else:
                read.append(path)
        images.append(read)
        others.append(other)
    return images, unsupported, empty, others


def _decode_error(path: Path, err: Exception) -> str:
    # torchvision's message starts with "<function>, <source file>:<line>, ".
    detail = re.sub(r"^[\w()]+, \S+:\d+, ", "", str(err).strip().splitlines()[0])
    if "Unsupported image file" in detail:
        detail = "unsupported image file"  # its list of formats, without the file
        what = (
            f"its bytes are not a {_FORMATS} image, whatever its name says (a web page or "
            "text saved under an image name, or another format renamed?)"
        )
        cure = (
            "check what it is (e.g. `file <path>`); convert it to PNG if it is an image, "
            "else delete it or move it out of the tree"
        )
    elif "Animated webp" in detail:
        what = "it is an animated WebP; one image per file is read"
        cure = "save the frame you want as PNG, or delete it"
    else:
        what = "it is truncated or corrupt (an interrupted copy or download?)"
        cure = "copy or download it again, or delete it (or move it out of the tree)"
    return f"Cannot decode {str(path)!r}: {what} (torchvision: {detail}). To fix: {cure}."


def _decode(path: Path, mode) -> Tensor:
    """One image, uint8 (C, H, W)."""
    from torchvision.io import decode_image

    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    try:
        image = decode_image(data, mode=mode)
    except RuntimeError as err:
        raise ValueError(_decode_error(path, err)) from err
    if image.dim() == 4:  # (frames, C, H, W): a GIF
        if len(image) != 1:
            raise ValueError(
                f"{str(path)!r} is an animated GIF ({len(image)} frames); one image per file "
                "is read. To fix: save the frame you want as PNG, or delete it."
            )
        image = image[0]
    if image.dtype == torch.uint16:  # 16-bit PNG: round(v * 255 / 65535), no ties
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise ValueError(
            f"{str(path)!r} decodes to {image.dtype}, not 8 or 16 bits per channel. "
            "To fix: convert it to an 8-bit PNG."
        )
    return image


def _check_scan(
    folder: Path,
    found: tuple[str, ...],
    per_class: list[list[Path]],
    unsupported: list[Path],
    empty: list[Path],
    others: list[list[Path]],
) -> None:
    """Refuse a scanned folder that cannot be read whole (formats torchvision cannot decode,
    empty files, a class without images), before any decoding; warn once of what is
    skipped."""
    if unsupported:
        counts = Counter(p.suffix.lower() for p in unsupported)
        kinds = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        files = "file is" if len(unsupported) == 1 else "files are"
        raise ValueError(
            f"{len(unsupported)} {files} in {str(folder)!r} in image formats torchvision "
            f"cannot decode ({kinds}): {_listed(unsupported)}. Only {_FORMATS_ALL} images "
            f"({'/'.join(IMAGE_SUFFIXES)}) are read. To fix: convert them to PNG (lossless) "
            "and remove the originals, e.g. with Pillow, "
            "`Image.open(p).convert('RGB').save(p.with_suffix('.png'))`, or ImageMagick, "
            f"`mogrify -format png *{unsupported[0].suffix}` in each class folder."
        )
    if empty:
        raise ValueError(
            f"{len(empty)} empty (0-byte) image file{'s' if len(empty) > 1 else ''} in {str(folder)!r}: {_listed(empty)} "
            "(an interrupted copy or download?). To fix: re-copy them, or delete them."
        )
    for name, files, other in zip(found, per_class, others):
        if not files:
            also = f"; it holds only {_listed(other)}" if other else ""
            raise FileNotFoundError(
                f"No {'/'.join(IMAGE_SUFFIXES)} images in {str(folder / name)!r}{also}."
            )
    skipped = [p for other in others for p in other]
    if skipped:
        entries = "entry" if len(skipped) == 1 else "entries"
        warnings.warn(
            f"{len(skipped)} {entries} in {str(folder)!r} not read (not a "
            f"{'/'.join(IMAGE_SUFFIXES)} image, or a sub-folder, which is not searched), "
            f"e.g. {_listed(skipped)}.",
            UserWarning,
            stacklevel=3,
        )


def read_image_folder(
    folder: str | Path,
    classes: tuple[str, ...] | None = None,
    shape: tuple[int, int, int] | None = None,
) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    """Decode every image of ``folder/<class>/*.{jpg,jpeg,png,webp,gif}``.

    Every class folder is listed and checked first (cheap); then the images are decoded.
    What is read, skipped or refused is in the module's docstring: in short, hidden files
    and folders (``.*``, e.g. macOS's ``._*`` and ``.DS_Store``) and OS junk (``Thumbs.db``,
    ``desktop.ini``, ``__MACOSX``) are skipped silently; ``.bmp``, ``.tif``/``.tiff`` and
    other formats torchvision cannot decode are refused (convert them); other files and
    sub-folders are skipped with one ``UserWarning``. 16-bit PNGs are converted to 8 bits,
    ``round(v * 255 / 65535)``.

    Args:
        folder: the split's folder.
        classes: the expected class folders (their order gives the labels); default: the
            sorted sub-folders that are not skipped.
        shape: the expected (C, H, W) of every image; images are decoded to C channels
            (1: grey, 3: RGB). Default: as stored, and all the same.

    Returns:
        uint8 images (N, C, H, W), int64 labels (N,), and the class names.

    Raises:
        FileNotFoundError: no such folder, or a class folder without images.
        ValueError: other class folders than ``classes``; files in formats torchvision
            cannot decode, or empty files (one error naming a few, before any decoding);
            a file that does not decode, or an animated GIF (naming it, with the cure);
            an image of another shape than ``shape`` (or than the first, without it).
    """
    from torchvision.io import ImageReadMode

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No image folder {str(folder)!r}.")
    found = tuple(p.name for p in _class_folders(folder))
    if classes is not None and found != tuple(classes):
        raise ValueError(
            f"{str(folder)!r} must hold one folder per class, {list(classes)}; found {list(found)}."
        )
    per_class, unsupported, empty, others = _scan(folder, found)
    _check_scan(folder, found, per_class, unsupported, empty, others)
    mode = ImageReadMode.UNCHANGED
    if shape is not None:
        mode = ImageReadMode.GRAY if shape[0] == 1 else ImageReadMode.RGB
    images, labels = [], []
    for label, files in enumerate(per_class):
        for path in files:
            image = _decode(path, mode)
            if shape is not None and tuple(image.shape) != tuple(shape):
                raise ValueError(
                    f"{str(path)!r} is {tuple(image.shape)} (C, H, W); every image must be {shape}."
                )
            if shape is None and images and image.shape != images[0].shape:
                raise ValueError(
                    f"{str(path)!r} is {tuple(image.shape)} (C, H, W), {str(per_class[0][0])!r} "
                    f"is {tuple(images[0].shape)}: the images differ. To fix: pass `shape` "
                    "(decodes to its channels), or resize them to one size."
                )
            images.append(image)
        labels.append(torch.full((len(files),), label, dtype=torch.int64, device="cpu"))
    return torch.stack(images), torch.cat(labels), found
