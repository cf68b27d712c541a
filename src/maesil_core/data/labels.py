"""Label sets: which classes a segmenter learns, what they are called, where they come from.

A :class:`LabelSet` is an ordered list of :class:`LabelClass` ``(id, name, source_ids)``:
the segmenter's output channel ``i + 1`` is class ``i``, written to label maps as ``id``, and
learnt from the voxels whose value in the *source* label map is one of ``source_ids`` (every
other source value becomes background 0). So one set can select, rename and merge classes of a
large source map, e.g. the 117-class TotalSegmentator map down to four abdominal organs::

    {"classes": [
        {"name": "liver",   "source": ["liver"]},
        {"name": "spleen",  "source": [1]},
        {"name": "kidneys", "source": ["kidney_left", "kidney_right"]}
    ]}

(a *mapping file*; sources are names from the source ``label_names.json`` or numeric ids;
``"id"`` may be given per class, otherwise ids are 1, 2, 3, ... in order). The short form
``{"liver": "liver", "kidneys": ["kidney_left", "kidney_right"]}`` means the same.
The set is stored in segmentation checkpoints (:meth:`LabelSet.to_dict`).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .slabs import empty_touched


@dataclass(frozen=True)
class LabelClass:
    """One output class: written as ``id``, called ``name``, made of ``source_ids``."""

    id: int
    name: str
    source_ids: tuple[int, ...]


@dataclass
class LabelSet:
    """Ordered foreground classes (background 0 is implicit)."""

    classes: list[LabelClass]

    def __post_init__(self) -> None:
        if not self.classes:
            raise DataError("the label set is empty; select at least one class.")
        ids = [c.id for c in self.classes]
        names = [c.name for c in self.classes]
        if len(set(ids)) != len(ids) or any(i <= 0 for i in ids):
            raise DataError(f"class ids must be distinct positive integers, got {ids}.")
        if len(set(names)) != len(names):
            raise DataError(f"class names must be distinct, got {names}.")
        seen: dict[int, str] = {}
        for c in self.classes:
            for s in c.source_ids:
                if s in seen:
                    raise DataError(
                        f"source label {s} is assigned to both {seen[s]!r} and {c.name!r}."
                    )
                if s == 0:
                    raise DataError(f"class {c.name!r}: source label 0 is the background.")
                seen[s] = c.name

    # ---------------------------------------------------------------- views

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def ids(self) -> list[int]:
        return [c.id for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def id_to_name(self) -> dict[int, str]:
        """``{id: name}`` of the output label map (what the ``.json`` beside it holds)."""
        return {c.id: c.name for c in self.classes}

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": [
                {"id": c.id, "name": c.name, "source_ids": list(c.source_ids)} for c in self.classes
            ]
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelSet:
        return cls(
            [
                LabelClass(int(c["id"]), str(c["name"]), tuple(int(s) for s in c["source_ids"]))
                for c in d["classes"]
            ]
        )

    # ---------------------------------------------------------------- arrays

    def _lut(self, max_value: int, values: Sequence[int]) -> np.ndarray:
        lut = np.zeros(max_value + 1, dtype=np.int32)
        for value, c in zip(values, self.classes):
            for s in c.source_ids:
                if s <= max_value:
                    lut[s] = value
        return lut

    def to_index(
        self,
        source: np.ndarray,
        dtype: type | None = None,
        check: Callable[[], Any] | None = None,
    ) -> np.ndarray:
        """Source label map -> training targets 0..K (class i -> i + 1, the rest -> 0), in
        ``dtype`` (default the smallest that holds K); ``check()`` is called between slabs
        (it raises to stop, :func:`apply_lut`)."""
        source = np.asarray(source)
        if source.size == 0:
            return source.astype(np.int64)
        if source.min() < 0:
            raise DataError("label maps must not hold negative values.")
        lut = self._lut(int(source.max()), list(range(1, len(self) + 1)))
        return apply_lut(lut.astype(dtype or _smallest(len(self))), source, check)

    def index_to_ids(self, index: np.ndarray) -> np.ndarray:
        """Predicted indices 0..K -> output ids (0 stays background), in the smallest integer
        type that holds them (uint8 for ids below 256: 1 byte a voxel)."""
        lut = np.array([0, *self.ids], dtype=_smallest(max(self.ids, default=0)))
        return apply_lut(lut, np.asarray(index))

    def to_ids(self, source: np.ndarray) -> np.ndarray:
        """Source label map -> output ids (select / rename / merge, the rest -> 0)."""
        return self.index_to_ids(self.to_index(source))

    def check_present(self, label_maps: Iterable[tuple[str, np.ndarray]]) -> None:
        """DataError naming the first class that occurs in none of the label maps."""
        found: set[int] = set()
        names = []
        for name, arr in label_maps:
            names.append(name)
            found.update(int(v) for v in np.unique(arr))
        for c in self.classes:
            if not found.intersection(c.source_ids):
                raise DataError(
                    f"class {c.name!r} (source labels {list(c.source_ids)}) occurs in none of "
                    f"the {len(names)} label maps; check `classes` / the mapping file."
                )


# --------------------------------------------------------------------------- building sets


def _resolve_source(item: Any, source_names: Mapping[int, str] | None, where: str) -> int:
    """A source entry (name or id) -> a source id; DataError for unknown names / ids."""
    if isinstance(item, bool):
        raise DataError(f"{where}: {item!r} is not a label name or id.")
    if isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.strip().isdigit()):
        value = int(item)
        if value <= 0:
            raise DataError(
                f"{where}: label id {value} is not a foreground label (ids start at 1)."
            )
        if source_names and value not in source_names:
            raise DataError(
                f"{where}: unknown label id {value}; the label names list ids "
                f"{_id_range(source_names)}."
            )
        return value
    if not isinstance(item, str):
        raise DataError(f"{where}: {item!r} is not a label name or id.")
    if not source_names:
        raise DataError(
            f"{where}: the class name {item!r} needs the names of the source labels; put a "
            "label_names.json beside the label maps or pass `label_names` FILE (or use ids)."
        )
    by_name = {v.lower(): k for k, v in source_names.items()}
    key = item.strip().lower()
    if key in by_name:
        return by_name[key]
    close = difflib.get_close_matches(key, list(by_name), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise DataError(f"{where}: unknown class name {item!r}{hint}.")


def _id_range(names: Mapping[int, str]) -> str:
    ids = sorted(names)
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 3 else str(ids)


def from_classes(
    wanted: Sequence[str | int], source_names: Mapping[int, str] | None = None
) -> LabelSet:
    """``classes=["liver", "spleen"]`` (names or ids) -> classes 1..K keeping the source names."""
    classes = []
    for i, item in enumerate(wanted, start=1):
        sid = _resolve_source(item, source_names, "`classes`")
        name = source_names.get(sid, str(item)) if source_names else str(item)
        if not source_names:
            name = f"label_{sid}"
        classes.append(LabelClass(i, name, (sid,)))
    return LabelSet(classes)


def from_mapping(
    mapping: Mapping[str, Any], source_names: Mapping[int, str] | None = None, where: str = "map"
) -> LabelSet:
    """A mapping object (see the module docstring, both forms) -> LabelSet."""
    if "classes" in mapping and isinstance(mapping["classes"], list):
        entries = mapping["classes"]
    else:
        entries = [{"name": k, "source": v} for k, v in mapping.items()]
    classes = []
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, Mapping) or "name" not in entry or "source" not in entry:
            raise DataError(
                f'{where}: every class needs "name" and "source", e.g. '
                '{"name": "kidneys", "source": ["kidney_left", "kidney_right"]}.'
            )
        sources = entry["source"]
        if not isinstance(sources, list):
            sources = [sources]
        if not sources:
            raise DataError(f"{where}: class {entry['name']!r} has no source labels.")
        ids = tuple(
            _resolve_source(s, source_names, f"{where}, class {entry['name']!r}") for s in sources
        )
        try:
            cid = int(entry.get("id", i))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: class {entry['name']!r} has a non-integer id.") from exc
        classes.append(LabelClass(cid, str(entry["name"]), ids))
    return LabelSet(classes)


def read_mapping_file(path: str | Path, source_names: Mapping[int, str] | None = None) -> LabelSet:
    """A JSON mapping file (see the module docstring) -> LabelSet."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels map {path} does not exist; give a JSON mapping file.")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"labels map {path} is not valid JSON ({exc}).") from exc
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"labels map {path} must be a non-empty JSON object.")
    return from_mapping(mapping, source_names, where=str(path))


def from_label_maps(
    label_maps: Iterable[np.ndarray], source_names: Mapping[int, str] | None = None
) -> LabelSet:
    """Every foreground value found in the label maps, named from ``source_names`` if known."""
    values: set[int] = set()
    for arr in label_maps:
        values.update(int(v) for v in np.unique(arr) if v > 0)
    if not values:
        raise DataError("the label maps hold no foreground label (all voxels are 0).")
    classes = []
    for i, v in enumerate(sorted(values), start=1):
        name = (source_names or {}).get(v, f"label_{v}")
        classes.append(LabelClass(i, name, (v,)))
    return LabelSet(classes)


def find_label_names(label_file: str | Path) -> dict[int, str] | None:
    """The names of a label map's ids: its own ``<stem>.json`` or the ``label_names.json``
    beside ``label_file`` (:func:`~.io.label_names_path`; in the folder, for a folder), else
    the ``labels`` map of an MSD / nnU-Net ``dataset.json`` in that folder or the one above
    (``Task/labelsTr/case.nii.gz`` -> ``Task/dataset.json``); None without either."""
    from .io import dataset_label_names, label_names_path, read_label_names

    p = Path(label_file)
    folder = p if p.is_dir() else p.parent
    candidate = folder / "label_names.json" if p.is_dir() else label_names_path(p)
    if candidate.is_file():
        return read_label_names(candidate)
    for where in (folder, folder.parent):
        if (where / "dataset.json").is_file():
            names = dataset_label_names(where / "dataset.json")
            if names:
                return names
    return None


def _smallest(largest: int) -> type:
    """The smallest integer type for values 0..``largest``."""
    return np.uint8 if largest < 256 else np.int16 if largest < 32768 else np.int32


def apply_lut(
    lut: np.ndarray, source: np.ndarray, check: Callable[[], Any] | None = None
) -> np.ndarray:
    """``lut[source]`` for an integer map (X, Y, Z), slab by slab along the last axis: no
    full-size int64 copy of the indices (0.8 GB at 512 x 512 x 400). ``check()`` is called
    before each slab (a cancel flag's check that raises: a long job stops within a slab)."""
    if source.ndim == 0 or source.shape[-1] == 0:
        return lut[source.astype(np.intp)]
    out = empty_touched(source.shape, lut.dtype, check)
    for z in range(0, source.shape[-1], 8):
        if check is not None:
            check()
        out[..., z : z + 8] = lut[source[..., z : z + 8].astype(np.intp)]
    return out
