"""MSD / nnU-Net ``dataset.json``: pairs and class names read with MONAI's datalist loader."""

from __future__ import annotations

import json
import os

import pytest

from maesil_core import segmentation as ft
from maesil_core.checkpoint import load_checkpoint
from maesil_core.config import preset
from maesil_core.data.inputs import resolve_inputs, resolve_pairs
from maesil_core.data.io import dataset_label_names, read_label_names
from maesil_core.data.labels import find_label_names
from maesil_core.errors import DataError

#: TotalSegmentator ids of abdomen_ct's labels
MSD_LABELS = {"0": "background", "1": "spleen", "5": "liver"}
NNUNET_LABELS = {"background": 0, "spleen": 1, "liver": 5}


def _task(tmp_path, shared_data, labels):
    """An MSD-style task folder over the real abdomen CT (symlinks, no copies)."""
    task = tmp_path / "Task01_Abdomen"
    for sub in ("imagesTr", "labelsTr"):
        (task / sub).mkdir(parents=True)
    os.symlink(shared_data / "abdomen_ct" / "ct.nii.gz", task / "imagesTr" / "abd.nii.gz")
    os.symlink(shared_data / "abdomen_ct" / "labels.nii.gz", task / "labelsTr" / "abd.nii.gz")
    meta = {
        "name": "abdomen",
        "labels": labels,
        "training": [{"image": "./imagesTr/abd.nii.gz", "label": "./labelsTr/abd.nii.gz"}],
        "test": ["./imagesTr/abd.nii.gz"],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


@pytest.mark.parametrize("labels", [MSD_LABELS, NNUNET_LABELS], ids=["msd", "nnunet"])
def test_class_names_come_from_the_dataset_json_labels_map(tmp_path, shared_data, labels):
    task = _task(tmp_path, shared_data, labels)
    assert dataset_label_names(task / "dataset.json") == {1: "spleen", 5: "liver"}
    assert find_label_names(task / "labelsTr" / "abd.nii.gz") == {1: "spleen", 5: "liver"}
    assert read_label_names(task / "dataset.json") == {1: "spleen", 5: "liver"}  # --label-names
    pairs = resolve_pairs([task / "dataset.json"])
    assert pairs == [
        {
            "image": str(task / "imagesTr" / "abd.nii.gz"),
            "label": str(task / "labelsTr" / "abd.nii.gz"),
        }
    ]
    # training and test list the same scan: one volume (resolved through the symlink)
    assert resolve_inputs([task / "dataset.json"]) == [
        str(shared_data / "abdomen_ct" / "ct.nii.gz")
    ]


def test_finetune_on_a_dataset_json_names_classes_from_its_labels(tmp_path, shared_data):
    task = _task(tmp_path, shared_data, MSD_LABELS)
    cfg = preset("smoke").override(
        "train", steps=1, batch_size=1, log_every=1, checkpoint_every=1000, threads=1
    )
    ft.finetune(task / "dataset.json", None, tmp_path / "run", cfg, classes=["liver"])
    classes = load_checkpoint(tmp_path / "run").meta.extra["labels"]["classes"]
    assert classes == [{"id": 1, "name": "liver", "source_ids": [5]}]


def test_bad_dataset_json_is_one_clear_line(tmp_path):
    bad = tmp_path / "dataset.json"
    bad.write_text(json.dumps({"labels": {"1": ["a", "b"]}, "training": ["x.nii.gz"]}))
    with pytest.raises(DataError, match="neither MSD"):
        dataset_label_names(bad)
    with pytest.raises(DataError, match="not MSD-style"):
        resolve_inputs([bad])
