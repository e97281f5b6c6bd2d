"""Which files of an image folder and a label folder make a dataset's samples (SeMask, arXiv 2112.12782).

Every dataset class (ADE20K, Cityscapes, COCO-Stuff 10k, folders, the toy set) lists its samples with
:func:`pair_files`, by these rules:

- The image ``<name><img_suffix>`` pairs with the label ``<name><seg_map_suffix>`` of the same relative path
  below the label folder; both folders are searched recursively.
- Suffixes match case-insensitively (``x.JPG`` is an image for ``.jpg``), and the two spellings of the JPEG and
  TIFF extensions are one (``.jpg``/``.jpeg``, ``.tif``/``.tiff``). Two files of one name that differ only there
  (``a.jpg`` and ``a.JPG``) are an error: which one is meant cannot be known.
- Errors (:class:`DatasetError`, naming the files): images without labels and labels without images; a name
  that matches a suffix but is no readable file (a folder, a dangling link); a folder that cannot be listed
  (permissions); an image file (by its extension:
  ``.png``, ``.jpg``, ...) in the image folder that does not match the image suffix -- an image of another
  format beside its twin, or one that would be left out.
- A notice (:class:`DatasetWarning`, shown when the dataset is built): every other file that is not used, by
  name -- files that are not images in the image folder, unused files in the label folder, and hidden files.
  Hidden files and folders (a name starting with ``.``: ``.DS_Store``, macOS's ``._x.jpg``,
  ``.ipynb_checkpoints/``) are never data. Symbolic links to folders are named there too: they are not
  searched (a link can loop). Files that a dataset's layout keeps beside its labels (Cityscapes'
  ``*_gtFine_color.png``, ...) are expected and not reported.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from semask.errors import SemaskError, UsageError

__all__ = ["DatasetError", "DatasetWarning", "IMAGE_EXTENSIONS", "suffix_spellings", "preview_list", "pair_files"]

# extensions of raster image files: one of these in an image folder that does not match the suffix is data left out
IMAGE_EXTENSIONS = frozenset({".avif", ".bmp", ".exr", ".gif", ".heic", ".heif", ".ico", ".j2k", ".jp2", ".jpe",
                              ".jpeg", ".jpg", ".jxl", ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tga", ".tif",
                              ".tiff", ".webp"})
_SPELLINGS = ((".jpg", ".jpeg"), (".tif", ".tiff"))  # extensions that name one format


class DatasetError(SemaskError, ValueError):
    """A dataset's files are missing, unpaired, unreadable or inconsistent; the message names the file."""


class DatasetWarning(UserWarning):
    """Files in a dataset's folders that are not used (not images or labels by the dataset's suffixes)."""


def preview_list(names: Sequence[str], limit: int = 10) -> str:
    """The first `limit` names joined by commas, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def suffix_spellings(suffix: str) -> tuple[str, ...]:
    """The lower-case file-name endings that count as `suffix`: ``".jpg"`` -> ``(".jpg", ".jpeg")``."""
    low = suffix.lower()
    for group in _SPELLINGS:
        for ext in group:
            if low.endswith(ext):
                return tuple(low[: -len(ext)] + other for other in group)
    return (low,)


def _matched(name: str, spellings: tuple[str, ...]) -> int:
    """Length of the spelling `name` ends with (case-insensitively), 0 for none."""
    low = name.lower()
    return next((len(s) for s in spellings if low.endswith(s)), 0)


def _scan(folder: Path, spellings: tuple[str, ...], what: str,
          suffix: str) -> tuple[dict[str, list[Path]], list[Path], list[Path]]:
    """Files below ``folder`` ending in a spelling of ``suffix`` by relative path minus it; the other files (and
    symbolic links to folders, which are not searched); the hidden files.

    Raises:
        DatasetError: a matching name that is not a readable file (a dangling symbolic link, a folder).
    """
    found: dict[str, list[Path]] = {}
    others: list[Path] = []
    hidden: list[Path] = []
    broken: list[str] = []
    unreadable: list[OSError] = []  # a folder that cannot be listed would silently hide its files
    for top, dirs, files in os.walk(folder, onerror=unreadable.append):  # not rglob: a third of the time
        rel = os.path.relpath(top, folder)
        prefix = "" if rel == "." else rel + os.sep
        top_hidden = any(part.startswith(".") for part in Path(prefix).parts)
        for name in dirs:  # symbolic links to folders are listed here but not entered
            if top_hidden or name.startswith("."):
                continue
            if _matched(name, spellings):
                broken.append(f"{prefix}{name} (a folder)")
            elif os.path.islink(os.path.join(top, name)):
                others.append(Path(top, name))
        for name in files:
            path = Path(top, name)
            n = _matched(name, spellings)
            if top_hidden or name.startswith("."):
                hidden.append(path)
            elif n and path.is_file():
                found.setdefault((prefix + name)[:-n], []).append(path)
            elif n:
                broken.append(prefix + name + (" (dangling symbolic link)" if path.is_symlink() else ""))
            else:
                others.append(path)
    if unreadable:
        raise DatasetError(f"{len(unreadable)} folder(s) under the {what} folder {folder} cannot be listed: "
                           + preview_list(sorted(f"{e.filename} ({e.strerror})" for e in unreadable))
                           + "; fix their permissions (nothing is skipped)")
    if broken:
        raise DatasetError(f"{len(broken)} {what} path(s) under {folder} ending in {suffix!r} are not readable "
                           f"files: {preview_list(sorted(broken))}; fix or remove them (nothing is skipped)")
    return found, others, hidden


def _unique(found: dict[str, list[Path]], folder: Path, what: str, suffix: str) -> dict[str, Path]:
    """One file per name, or an error naming the names that have several (``a.jpg`` and ``a.JPG``)."""
    several = sorted(" and ".join(sorted(str(p.relative_to(folder)) for p in paths))
                     for paths in found.values() if len(paths) > 1)
    if several:
        raise DatasetError(f"{len(several)} {what} name(s) under {folder} have more than one file matching "
                           f"{suffix!r} (suffixes match case-insensitively, .jpg and .jpeg alike): "
                           f"{preview_list(several)}; keep one of each")
    return {key: paths[0] for key, paths in found.items()}


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _depth_below(parent: Path, folder: Path) -> int:
    """How many folders deep `folder` is if it is or holds the resolved folder `parent`, else -1."""
    return len(folder.parts) if folder == parent or folder in parent.parents else -1


def _unused(img_dir: Path, ann_dir: Path, others: list[Path], used: list[Path]) -> tuple[list[Path], list[Path]]:
    """The files of overlapping image and label folders that are not used, split into those of the image folder
    (the deeper of the two that holds them; the image folder when it is the same) and those of the label folder."""
    folders: dict[str, str] = {}

    def key(p: Path) -> tuple[str, str]:  # a folder reached by two names is one; resolved once per folder
        parent, name = os.path.split(p)
        if parent not in folders:
            folders[parent] = os.path.realpath(parent)
        return folders[parent], name

    taken = {key(p) for p in used}
    img_real, ann_real = img_dir.resolve(), ann_dir.resolve()
    img_files, ann_files, seen = [], [], set()
    for p in others:
        if key(p) in taken or key(p) in seen:
            continue
        seen.add(key(p))
        parent = Path(key(p)[0])
        image_side = _depth_below(parent, img_real) >= _depth_below(parent, ann_real)
        (img_files if image_side else ann_files).append(p)
    return img_files, ann_files


def _rel(paths: Sequence[Path], folder: Path) -> list[str]:
    return sorted(os.path.relpath(p, folder) + (" (a linked folder, not searched)" if p.is_dir() else "")
                  for p in paths)


def _refuse_other_images(img_dir: Path, img_suffix: str, strays: list[Path], images: dict[str, Path]) -> None:
    """Images of another format in the image folder would be left out: an error naming them (and their twins)."""
    if not strays:
        return
    named = []
    for p in sorted(strays):
        rel = os.path.relpath(p, img_dir)
        twin = images.get(str(Path(rel).with_suffix("")))
        named.append(f"{rel} (beside {twin.name})" if twin is not None else rel)
    raise DatasetError(f"{len(strays)} image file(s) under {img_dir} do not end in {img_suffix!r} and would be left "
                       f"out: {preview_list(named)}; convert or rename them to '<name>{img_suffix}', or move them "
                       "out of the folder")


def _notice(folder: Path, files: list[Path], rule: str) -> None:
    if files:
        warnings.warn(DatasetWarning(f"{len(files)} file(s) under {folder} are not used ({rule}): "
                                     f"{preview_list(_rel(files, folder))}"), stacklevel=3)


def pair_files(img_dir: str | Path, ann_dir: str | Path, img_suffix: str, seg_map_suffix: str, *,
               expected: Sequence[str] = ()) -> list[tuple[Path, Path]]:
    """Pair every image below ``img_dir`` with the label of the same relative name below ``ann_dir``.

    The rules (case-insensitive suffixes, what is an error, what a notice) are this module's.

    Args:
        img_dir: image folder (searched recursively).
        ann_dir: label folder (searched recursively).
        img_suffix: how image file names end, e.g. ``".jpg"`` or ``"_leftImg8bit.png"``.
        seg_map_suffix: how label file names end, e.g. ``".png"`` or ``"_gtFine_labelTrainIds.png"``.
        expected: endings of files that the dataset's layout keeps beside its labels and that are not used
            (e.g. Cityscapes' ``"_gtFine_color.png"``); they are not reported.

    Returns:
        ``(image_path, label_path)`` pairs sorted by name.

    Warns:
        DatasetWarning: files of the folders that are not used, by name (hidden files included).

    Raises:
        FileNotFoundError: a folder is missing.
        DatasetError: no images, images without labels or labels without images, two files of one name,
            image files of another suffix in the image folder.
    """
    img_dir, ann_dir = Path(img_dir), Path(ann_dir)
    for folder, what in ((img_dir, "image"), (ann_dir, "label")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    for suffix, name in ((img_suffix, "img_suffix"), (seg_map_suffix, "seg_map_suffix")):
        if not isinstance(suffix, str) or not suffix:
            raise UsageError(f"{name} must be a non-empty string such as '.jpg' (how the file names end), got "
                             f"{suffix!r}: with an empty suffix every file would pair with every other")
    img_spellings, ann_spellings = suffix_spellings(img_suffix), suffix_spellings(seg_map_suffix)
    overlap = _overlap(img_dir, ann_dir)
    if overlap and any(a.endswith(b) or b.endswith(a) for a in img_spellings for b in ann_spellings):
        raise UsageError(f"img_suffix {img_suffix!r} and seg_map_suffix {seg_map_suffix!r} clash: the image and "
                         f"label folders ({img_dir}, {ann_dir}) overlap, so one file would match both; give "
                         "suffixes that tell images from labels (e.g. '_img.png' and '_label.png')")
    found, img_others, img_hidden = _scan(img_dir, img_spellings, "image", img_suffix)
    images = _unique(found, img_dir, "image", img_suffix)
    found, ann_others, ann_hidden = _scan(ann_dir, ann_spellings, "label", seg_map_suffix)
    labels = _unique(found, ann_dir, "label", seg_map_suffix)
    if overlap:
        img_others, ann_others = _unused(img_dir, ann_dir, img_others + ann_others,
                                         [*images.values(), *labels.values()])
        img_hidden, ann_hidden = _unused(img_dir, ann_dir, img_hidden + ann_hidden, [])
    companions = tuple(e.lower() for e in expected)
    ann_others = [p for p in ann_others if not p.name.lower().endswith(companions)] if companions else ann_others
    strays = [p for p in img_others if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise DatasetError(f"no images ending in {img_suffix!r} under {img_dir}"
                           + (f"; it holds {len(strays)} image file(s) ending otherwise: "
                              f"{preview_list(_rel(strays, img_dir))}" if strays else ""))
    _refuse_other_images(img_dir, img_suffix, strays, images)
    no_label = sorted(set(images) - set(labels))
    if no_label:
        raise DatasetError(f"{len(no_label)} image(s) under {img_dir} have no label '<name>{seg_map_suffix}' "
                           f"under {ann_dir}: {preview_list([str(images[k].relative_to(img_dir)) for k in no_label])}")
    no_image = sorted(set(labels) - set(images))
    if no_image:
        raise DatasetError(f"{len(no_image)} label(s) under {ann_dir} have no image '<name>{img_suffix}' under "
                           f"{img_dir}: {preview_list([str(labels[k].relative_to(ann_dir)) for k in no_image])}")
    if img_dir.resolve() == ann_dir.resolve():
        _notice(img_dir, img_others + img_hidden + ann_others + ann_hidden,
                f"only '<name>{img_suffix}' images and '<name>{seg_map_suffix}' labels are read")
    else:
        _notice(img_dir, img_others + img_hidden, f"only '<name>{img_suffix}' images are read there")
        _notice(ann_dir, ann_others + ann_hidden, f"only '<name>{seg_map_suffix}' labels are read there")
    return [(images[k], labels[k]) for k in sorted(images)]
