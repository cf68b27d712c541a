"""Which files a run reads: files, folders, globs, ``.txt`` lists and MSD ``dataset.json``
turned into volumes (:func:`resolve_inputs`; a DICOM series folder counts as one), images
paired with their label maps by name (:func:`resolve_pairs`), and the header-only checks and
listing done before a run starts (:func:`check_inputs`, :func:`describe_scans`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from .io import has_image_suffix, is_dicom_dir, is_dicom_file

LABEL_MARKERS = ("label", "seg", "mask")

NOTHING_FOUND = (
    "no CT files found in {where}; give .nii/.nii.gz files, DICOM folders, a .txt list "
    "or a dataset.json"
)


def _is_label_name(rel: Path) -> bool:
    return any(m in part.lower() for part in rel.parts for m in LABEL_MARKERS)


def _scan_folder(folder: Path, skip_labels: bool) -> list[Path]:
    """CT files under ``folder`` (recursive); each DICOM series folder counts as one."""
    if is_dicom_dir(folder):
        return [folder]
    found: list[Path] = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        rel = child.relative_to(folder)
        if skip_labels and _is_label_name(rel):
            continue
        if child.is_dir():
            found += _scan_folder(child, skip_labels)
        elif child.is_file() and has_image_suffix(child):
            found.append(child)
    return found


def _read_list(txt: Path) -> list[str]:
    entries = []
    for line in txt.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            p = Path(line).expanduser()
            entries.append(str(p if p.is_absolute() else txt.parent / p))
    return entries


def _read_dataset_json(path: Path, with_labels: bool = False) -> list[Any]:
    """MSD-style ``dataset.json``: ``training`` entries' images (and ``test`` images), read
    with MONAI's datalist loader (paths relative to the file's folder).

    With ``with_labels``, the ``training`` entries as ``{"image", "label"}`` dicts.
    """
    from monai.data import load_decathlon_datalist

    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); fix the dataset file.") from exc
    if not isinstance(meta, dict) or not ({"training", "test"} & set(meta)):
        raise DataError(
            f"{path} is not an MSD-style dataset.json (no 'training' or 'test' list); "
            'write {"training": [{"image": "...", "label": "..."}], "test": ["..."]}.'
        )

    def entries(key: str) -> list[dict[str, Any]]:
        if not meta.get(key):
            return []
        try:
            items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key)
        except (TypeError, ValueError, KeyError) as exc:
            raise DataError(
                f"{path}: its {key!r} list is not MSD-style ({exc}); write each entry as "
                '{"image": "imagesTr/case.nii.gz", "label": "labelsTr/case.nii.gz"}.'
            ) from exc
        for item in items:
            if "image" not in item or (with_labels and "label" not in item):
                need = "'image' and 'label' for fine-tuning" if with_labels else "an 'image'"
                raise DataError(f"{path}: every {key!r} entry needs {need}.")
        return items

    training = entries("training")
    if with_labels:
        return [{"image": str(e["image"]), "label": str(e["label"])} for e in training]
    return [str(e["image"]) for e in training + entries("test")]


def _resolve_one(item: str | Path, skip_labels: bool, depth: int = 0) -> list[Path]:
    if depth > 5:
        raise DataError(f"{item}: lists nested too deeply; list image files directly.")
    text = str(item)
    path = Path(text).expanduser()
    if path.is_dir():
        found = _scan_folder(path, skip_labels)
        if not found:
            raise DataError(NOTHING_FOUND.format(where=path))
        return found
    if path.is_file():
        low = path.name.lower()
        if low.endswith(".txt"):
            out: list[Path] = []
            for entry in _read_list(path):
                out += _resolve_one(entry, skip_labels, depth + 1)
            if not out:
                raise DataError(NOTHING_FOUND.format(where=path))
            return out
        if low.endswith(".json"):
            out = []
            for entry in _read_dataset_json(path):
                out += _resolve_one(entry, False, depth + 1)
            if not out:
                raise DataError(NOTHING_FOUND.format(where=path))
            return out
        if has_image_suffix(path):
            return [path]
        if is_dicom_file(path):
            return [path.parent]
        raise DataError(
            f"{path} is not a CT file; give .nii/.nii.gz/.nrrd files, DICOM folders, "
            "a .txt list or a dataset.json."
        )
    if any(c in text for c in "*?["):
        matches = sorted(glob.glob(text, recursive=True))
        out = []
        for m in matches:
            mp = Path(m)
            if mp.is_file() and not (has_image_suffix(mp) or is_dicom_file(mp)):
                continue
            if skip_labels and mp.is_file() and _is_label_name(Path(mp.name)):
                continue
            out += _resolve_one(mp, skip_labels, depth + 1)
        if not out:
            raise DataError(NOTHING_FOUND.format(where=f"the pattern {text!r}"))
        return out
    raise DataError(f"{path} does not exist; check the path (or quote a glob pattern).")


def resolve_inputs(
    items: Sequence[str | Path] | str | Path,
    *,
    skip_labels: bool = True,
    follow_links: bool = True,
) -> list[str]:
    """Expand files, folders, globs, ``.txt`` lists and ``dataset.json`` into volume paths.

    Folders are scanned recursively for ``.nii/.nii.gz/.nrrd`` files and DICOM series
    (one entry per series folder); names containing label/seg/mask are skipped there
    (``skip_labels``). Returns absolute paths as strings, in order, without duplicates
    (two links to one file count once); with ``follow_links`` False the paths keep the
    names they were found under (pairing by name needs the link's name, not its target's).
    """
    if isinstance(items, (str, Path)):
        items = [items]
    if not items:
        raise DataError(NOTHING_FOUND.format(where="the (empty) input list"))
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        for p in _resolve_one(item, skip_labels):
            s = str(Path(p).resolve())
            if s not in seen:
                seen.add(s)
                out.append(s if follow_links else os.path.abspath(p))
    return out


#: file stems that say "the image" / "the label map" of a case folder (ct.nii.gz, labels.nii.gz)
IMAGE_STEMS = ("ct", "image", "img", "imaging", "volume", "scan")
LABEL_STEMS = ("labels", "label", "seg", "segmentation", "mask", "labelmap")
#: name endings of label maps beside their image: case_seg, case_label(s), case_mask
_LABEL_SUFFIX = re.compile(r"[_\-.](seg|segmentation|labels?|mask|labelmap)$", re.IGNORECASE)
#: nnU-Net's channel suffix of images: imagesTr/case_0000.nii.gz <-> labelsTr/case.nii.gz
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


def _stem(path: str | Path) -> str:
    from .io import strip_suffix

    return strip_suffix(Path(path).name)


def image_keys(path: str | Path) -> list[str]:
    """The case names an image file may go by, most specific first: ``case.nii.gz`` ->
    ``case``; ``case_0000.nii.gz`` -> ``case_0000``, then ``case`` (nnU-Net's channel
    suffix); ``case1/ct.nii.gz`` -> ``case1`` (a generic name takes its folder's)."""
    stem = _stem(path)
    if stem.lower() in IMAGE_STEMS:
        stem = Path(path).parent.name
    keys = [stem.lower()]
    bare = _CHANNEL_SUFFIX.sub("", stem).lower()
    return keys + [bare] if bare != keys[0] else keys


def label_key(path: str | Path) -> str:
    """The case name of a label map: ``case_seg`` / ``case_label(s)`` / ``case_mask`` ->
    ``case``; ``case1/labels.nii.gz`` -> ``case1``; ``case_labels/labels.nii.gz`` -> ``case``."""
    stem = _stem(path)
    if stem.lower() in LABEL_STEMS:
        stem = Path(path).parent.name
    return _LABEL_SUFFIX.sub("", stem).lower()


def _names(files: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def pair_by_name(images: Sequence[str], labels: Sequence[str]) -> list[tuple[str, str]] | None:
    """Each image with the label map of the same case name (:func:`image_keys`,
    :func:`label_key`); a label map in the image's own folder wins over one elsewhere.
    None when no name matches at all (the caller may then pair in order); DataError naming
    the files when only some match or a name is ambiguous."""
    by_key: dict[str, list[str]] = {}
    for lab in labels:
        by_key.setdefault(label_key(lab), []).append(lab)
    pairs, unpaired = [], []
    for img in images:
        found = next((by_key[k] for k in image_keys(img) if k in by_key), [])
        if len(found) > 1:  # several with that name: the one beside the image
            found = [lab for lab in found if Path(lab).parent == Path(img).parent] or found
        if len(found) > 1:
            raise DataError(
                f"{img} could be paired with several label maps ({_names(found)}); give the "
                "label maps as files in the order of the images, or a dataset.json."
            )
        if found:
            pairs.append((img, found[0]))
        else:
            unpaired.append(img)
    if not pairs:
        return None
    used = {lab for _, lab in pairs}
    spare = [lab for lab in labels if lab not in used]
    twice = sorted({lab for _, lab in pairs if sum(lab == b for _, b in pairs) > 1})
    if twice:
        raise DataError(
            f"the label map {twice[0]} matches several images by name; give the label maps as "
            "files in the order of the images, or a dataset.json."
        )
    if unpaired:
        hint = f" (label maps left over: {_names(spare)})" if spare else ""
        raise DataError(
            f"no label map found for {_names(unpaired)}{hint}: name each label map after its "
            "image (case.nii.gz <-> case_seg.nii.gz / case_label(s).nii.gz, ct.nii.gz <-> "
            "labels.nii.gz in one folder, nnU-Net case_0000.nii.gz <-> case.nii.gz), or give "
            "the label maps as files in the order of the images."
        )
    return pairs


def resolve_pairs(
    images: Sequence[str | Path] | str | Path,
    labels: Sequence[str | Path] | str | Path | None = None,
) -> list[dict[str, str]]:
    """``[{"image": path, "label": path}, ...]`` for fine-tuning.

    Either ``images`` is a ``dataset.json`` (its ``training`` image/label entries) and
    ``labels`` is None, or both resolve like :func:`resolve_inputs` (label names kept for
    ``labels``, and files found among the images left out of them, so ``--images case/
    --labels case/`` works) and are paired by case name (:func:`pair_by_name`: ``ct`` /
    ``labels`` in one folder, ``case`` / ``case_seg`` or ``case_label(s)``, nnU-Net's
    ``case_0000`` / ``case``); when no name matches, in order (folders sorted by name), if
    the counts agree. Every pairing error names the files it found.
    """
    if isinstance(images, (str, Path)):
        images = [images]
    if labels is None:
        if len(images) == 1 and str(images[0]).lower().endswith(".json"):
            path = Path(images[0])
            if not path.is_file():
                raise DataError(f"{path} does not exist; check the path.")
            pairs = _read_dataset_json(path, with_labels=True)
            if not pairs:
                raise DataError(f"{path} has no 'training' image/label pairs.")
            for pair in pairs:
                for key in ("image", "label"):
                    if not Path(pair[key]).exists():
                        raise DataError(f"{pair[key]} (listed in {path}) does not exist.")
            return pairs
        raise DataError(
            "fine-tuning needs label maps: give labels (files/folder/.txt) or a dataset.json "
            "with image/label pairs."
        )
    image_files = resolve_inputs(images, follow_links=False)
    found_labels = resolve_inputs(labels, skip_labels=False, follow_links=False)
    is_image = {os.path.realpath(f) for f in image_files}
    label_files = [f for f in found_labels if os.path.realpath(f) not in is_image]
    if not label_files:
        raise DataError(
            f"no label maps found in {_names([str(x) for x in labels])}: only the images "
            f"{_names(image_files)}; name label maps labels.nii.gz, case_seg.nii.gz, ... or "
            "give them as files."
        )
    if len(image_files) == len(label_files) == 1:
        return [{"image": image_files[0], "label": label_files[0]}]
    pairs = pair_by_name(image_files, label_files)
    if pairs is None:
        if len(image_files) != len(label_files):
            raise DataError(
                f"found {len(image_files)} images ({_names(image_files)}) but "
                f"{len(label_files)} label maps ({_names(label_files)}), and no names that "
                "pair them; give one label map per image named after it (case_seg.nii.gz, "
                "labels.nii.gz beside ct.nii.gz), files in the same order, or a dataset.json."
            )
        pairs = list(zip(image_files, label_files))
    return [{"image": i, "label": lab} for i, lab in pairs]


def check_inputs(files: Sequence[str | Path]) -> list[str]:
    """Cheap header check of every file (no voxel data read): exists, readable, 3D.

    Raises a DataError naming the first bad file; returns the files as strings.
    NaN checks need the voxels: they happen in ``load_volume`` when each file is loaded.
    """
    import nibabel as nib

    out = []
    for f in files:
        p = Path(f)
        if not p.exists():
            raise DataError(f"{p} does not exist; check the path.")
        if p.is_dir():
            if not is_dicom_dir(p):
                raise DataError(
                    f"{p} is a folder without DICOM files; give .nii/.nii.gz files or a "
                    "DICOM series folder."
                )
        elif p.name.lower().endswith((".nii", ".nii.gz")):
            try:
                img = nib.load(str(p))
                shape = tuple(img.shape)
            except Exception as exc:
                raise DataError(
                    f"{p} is not a readable NIfTI file ({type(exc).__name__}); "
                    "re-copy or re-export it, or leave it out."
                ) from exc
            spatial = [s for s in shape[3:] if s != 1]
            if len(shape) < 3 or min(shape[:3]) < 2:
                raise DataError(f"{p} is a 2D image (shape {shape}); give 3D CT volumes.")
            if spatial:
                raise DataError(
                    f"{p} has shape {shape} (several channels or time points); give single "
                    "3D volumes."
                )
        elif not has_image_suffix(p):
            raise DataError(f"{p} is not a CT file; give .nii/.nii.gz/.nrrd or DICOM folders.")
        out.append(str(p))
    return out


def describe_scans(files: Sequence[str | Path], limit: int = 10) -> str:
    """What a run is about to train on, for the user: the number of scans and, for the
    first ``limit``, their shape and spacing from the headers (:func:`~.io.read_header`)::

        found 2 scans:
          abdomen_ct/ct.nii.gz   122 x 101 x 30   3.00 x 3.00 x 3.00 mm   NIfTI
          dicom_ct               512 x 512 x 20   0.98 x 0.98 x 2.00 mm   DICOM
    """
    from .io import read_header

    files = list(files)
    rows = []
    for f in files[:limit]:
        p = Path(f)
        name = p.name if p.is_dir() else f"{p.parent.name}/{p.name}"
        try:
            h = read_header(p)
        except DataError as exc:
            rows.append((name, "?", str(exc), ""))
            continue
        shape = " x ".join(str(v) for v in h.shape)
        spacing = " x ".join(f"{v:.2f}" for v in h.spacing) + " mm"
        rows.append((name, shape, spacing, h.kind))
    widths = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
    n = len(files)
    lines = [f"found {n} scan{'s' if n != 1 else ''}:"]
    for name, shape, spacing, kind in rows:
        lines.append(
            f"  {name:<{widths[0]}}  {shape:>{widths[1]}}  {spacing:<{widths[2]}}  {kind}".rstrip()
        )
    if n > limit:
        lines.append(f"  ... and {n - limit} more")
    return "\n".join(lines)
