"""Prediction inputs checked before the first case (``nnunet-diffusion predict``), and the raw training images at
trainer start (``trainers.common.data_checks.check_training_images``).

nnU-Net's own reading is trusting: SimpleITK reads a truncated ``.nii.gz`` (or ``.nii``) and fills what is missing
with zeros, a missing ``_0000`` suffix or a 4D file ends in an ``IndexError`` deep in preprocessing, a missing
folder in a bare traceback. Here, first: the folder holds files with the dataset's ``file_ending``
(``InputFolderError`` otherwise); each case has exactly dataset.json's channels; each file is read whole (a gzip
stream to its end, a NIfTI file against its header's size, other formats by their reader: ``whole_files``); dimensionality and
geometry agree across a case's channels and fit the configuration. Each bad case gets one message naming the file,
what is wrong and the fix; the good cases are predicted anyway.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from nnunet_diffusion.inference.whole_files import read_image, whole_file_problem

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class InputFolderError(ValueError):
    """No case of the input folder can be predicted (missing, empty, or no file of the model's format)."""


@dataclass
class InputCase:
    """One case of the input folder: its channel files (paths, in channel order) and what is wrong with it."""
    name: str
    files: list
    problems: list = field(default_factory=list)
    missing: list = field(default_factory=list)  # (channel, name) without a file of its own

    @property
    def message(self) -> str:
        return f"{self.name}: " + "; ".join(self.problems)


# ---- the input folder and its cases -----------------------------------------------------------------------------

def channel_list(channel_names: dict) -> list:
    """dataset.json's channel_names as [(0, 'T1'), ...]."""
    return sorted((int(k), str(v)) for k, v in channel_names.items())


def _names(channels: list) -> str:
    return ", ".join(f"{c} '{n}'" for c, n in channels)


def input_files(folder: str, file_ending: str, channel_names: dict) -> list:
    """The names of the files in ``folder`` with the model's ending; InputFolderError (with the fix) if there is
    no folder or no such file."""
    layout = ", ".join(f"<case>_{c:04d}{file_ending} ({n})" for c, n in channel_list(channel_names))
    if not os.path.exists(folder):
        raise InputFolderError(f"The input folder {folder} (-i) does not exist. Give the folder that holds the images "
                               f"to segment, one file per channel: {layout}.")
    if not os.path.isdir(folder):
        raise InputFolderError(f"-i {folder} is a file, not a folder: give the folder that holds the images "
                               f"({os.path.dirname(os.path.abspath(folder))}?), one file per channel: {layout}.")
    entries = sorted(e for e in os.listdir(folder) if os.path.isfile(os.path.join(folder, e)))
    names = [e for e in entries if e.endswith(file_ending)]
    if names:
        return names
    if not entries:
        raise InputFolderError(f"The input folder {folder} is empty: put the images to segment there, one file per "
                               f"channel: {layout}.")
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise InputFolderError(f"The input folder {folder} holds no {file_ending} file ({len(entries)} other files: "
                           f"{shown}); this model reads {file_ending} images, one file per channel: {layout}. "
                           f"Convert them to {file_ending}.")


def group_cases(folder: str, names: Sequence[str], file_ending: str, channel_names: dict) -> list:
    """The cases of the files ``names`` (sorted by name), with the naming problems found: no channel suffix,
    channel files missing or beyond the model's channels (a 4D file may stand for several channels: see
    ``check_case``)."""
    channels = channel_list(channel_names)
    wanted = {c for c, _ in channels}
    by_case, unsuffixed = {}, {}
    for name in names:
        stem = name[:-len(file_ending)]
        match = CHANNEL_SUFFIX.match(stem)
        if match:
            by_case.setdefault(match["case"], {})[int(match["channel"])] = name
        else:
            unsuffixed[stem] = name
    cases = []
    for case in sorted(set(by_case) | set(unsuffixed)):
        present = by_case.get(case, {})
        item = InputCase(case, [os.path.join(folder, present[c]) for c in sorted(present)])
        if case in unsuffixed:
            rename = ", ".join(f"{case}_{c:04d}{file_ending} ({n})" for c, n in channels)
            item.problems.append(f"{unsuffixed[case]} has no channel suffix: rename it "
                                 f"{case}_0000{file_ending}" + (f" (this model takes {len(channels)} channels, one "
                                                               f"file each: {rename})" if len(channels) > 1 else ""))
        extra = sorted(set(present) - wanted)
        for c in extra:
            item.problems.append(f"{present[c]} would be channel {c}, but the model takes {len(channels)} "
                                 f"({_names(channels)}): move it out of the input folder, or, if it is a case of its "
                                 f"own, add the channel suffix ({present[c][:-len(file_ending)]}_0000{file_ending})")
        item.missing = [(c, n) for c, n in channels if c not in present] if present else []
        cases.append(item)
    return cases


def check_case(case: InputCase, file_ending: str, channel_names: dict, configuration: str, patch_dims: int,
               reader_class=None, previous_stage_folder: Optional[str] = None) -> InputCase:
    """Read each file of ``case`` whole and check its channels against each other and the configuration (patch of
    ``patch_dims`` axes); the problems are added to ``case.problems``."""
    channels = channel_list(channel_names)
    named_ok = not case.problems  # no naming problem so far
    infos = {}
    for path in case.files:
        info, problem = read_image(path, reader_class)
        if problem:
            case.problems.append(problem)
        else:
            infos[path] = info
    for path, info in infos.items():
        name = os.path.basename(path)
        if info.dimension not in (2, 3, 4):
            case.problems.append(f"{name} is a {info.dimension}D image: the model reads 2D or 3D images, one file per "
                                 f"channel")
        elif info.components > 1:
            case.problems.append(f"{name} has {info.components} values per voxel (a colour or vector image): save "
                                 f"one grey-value image per channel ({_names(channels)})")
        elif patch_dims == 3 and (info.dimension == 2 or 1 in info.size[:3]):
            what = "a 2D image" if info.dimension == 2 else f"a volume of one slice ({_show(info.size)})"
            case.problems.append(f"{name} is {what}, but configuration '{configuration}' segments 3D volumes: give "
                                 f"the 3D volume, or predict with a model of 2D images (-c 2d)")
    several = {p: i for p, i in infos.items() if i.channels > 1}  # a 4D file (or a colour image) holds several
    if several and named_ok and len(infos) == len(case.files):
        held = sum(i.channels for i in infos.values())
        if held != len(channels):
            path, info = next(iter(several.items()))
            name = os.path.basename(path)
            what = (f"a 4D image ({info.channels} volumes in one file)" if info.dimension == 4
                    else f"an image of {info.channels} channels")
            files = (f"one file per channel ({', '.join(f'{case.name}_{c:04d}{file_ending}' for c, _ in channels)})"
                     if len(channels) > 1 else name)
            case.problems.append(f"{name} is {what}, but the model takes {len(channels)} channel"
                                 f"{'s' if len(channels) > 1 else ''} ({_names(channels)}): save the volume to segment "
                                 f"as a 3D image, {files}")
    elif not several:
        for c, n in case.missing:
            case.problems.append(f"channel {c} ('{n}') is missing: add {case.name}_{c:04d}{file_ending}")
    if not case.problems:
        geometry = _geometry_problem(infos)
        if geometry:
            case.problems.append(geometry)
    if previous_stage_folder is not None:
        seg = os.path.join(previous_stage_folder, case.name + file_ending)
        if not os.path.isfile(seg):
            case.problems.append(f"the previous stage's segmentation {seg} is missing: predict the case with the "
                                 f"previous stage's model first (-prev_stage_predictions)")
        else:
            problem = whole_file_problem(seg)
            if problem:
                case.problems.append(f"the previous stage's segmentation {seg} {problem}: predict it again with the "
                                     f"previous stage's model")
    return case


def _geometry_problem(infos: dict) -> Optional[str]:
    """What differs between a case's channel files (nnU-Net's reader stops on a different size or spacing)."""
    if len(infos) < 2:
        return None
    for what, key in (("size", lambda i: (i.dimension if i.dimension < 4 else 3, tuple(i.size[:3]))),
                      ("spacing", lambda i: tuple(float(s) for s in i.spacing[:3]))):
        values = {os.path.basename(p): key(i) for p, i in infos.items()}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{n}: {_show(v[1] if what == 'size' else v)}" for n, v in values.items())
            return (f"its channel files differ in {what} ({shown}): resample them onto one grid (channel 0's), as "
                    f"they were for training")
    return None


def _show(values) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclass
class CheckedInputs:
    """The cases of one run (this part of them, with -num_parts): those to predict and those refused."""
    folder: str
    good: list
    refused: list
    unchecked: list  # predicted before (--continue_prediction): left to the predictor, which skips complete ones
    output_folder: Optional[str] = None
    file_ending: str = ".nii.gz"

    @property
    def to_predict(self) -> list:
        return sorted(self.good + self.unchecked, key=lambda c: c.name)

    @property
    def stale(self) -> list:
        """Refused cases that have a segmentation in the output folder from an earlier run (left as it is)."""
        if self.output_folder is None:
            return []
        return [c for c in self.refused if os.path.isfile(os.path.join(self.output_folder, c.name + self.file_ending))]


def check_inputs(folder: str, dataset_json: dict, plans: dict, configuration: str, output_folder: Optional[str] = None,
                 continue_prediction: bool = False, part_id: int = 0, num_parts: int = 1,
                 previous_stage_folder: Optional[str] = None, save_probabilities: bool = False) -> CheckedInputs:
    """Every case of ``folder`` (of part ``part_id`` of ``num_parts``), checked: InputFolderError if none can be
    predicted at all, else the good and the refused cases. With ``continue_prediction``, cases whose segmentation
    (and probabilities, with ``save_probabilities``) are in ``output_folder`` already are not read again (the
    predictor decides whether they are complete)."""
    file_ending = dataset_json["file_ending"]
    channel_names = dataset_json.get("channel_names") or dataset_json.get("modality") or {"0": "image"}
    previous_stage = _configuration_entry(plans, configuration, "previous_stage")
    if previous_stage and previous_stage_folder is None:  # nnU-Net's predictor would fail deep inside, per case
        raise InputFolderError(f"{configuration} is a cascade's second stage: it needs the {previous_stage} model's "
                               f"segmentations of the images. Predict -i with -c {previous_stage} first and pass "
                               f"that output folder as -prev_stage_predictions.")
    patch_dims = len(_configuration_entry(plans, configuration, "patch_size") or (0, 0, 0))
    try:
        from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
        reader_class = recursive_find_reader_writer_by_name(plans["image_reader_writer"])
    except Exception:  # a reader nnU-Net cannot find here: its own error comes when the model loads
        reader_class = None
    names = input_files(folder, file_ending, channel_names)
    cases = group_cases(folder, names, file_ending, channel_names)[part_id::num_parts]
    good, refused, unchecked = [], [], []
    for case in cases:
        if continue_prediction and output_folder is not None and not case.problems and _predicted(
                os.path.join(output_folder, case.name), file_ending, save_probabilities):
            unchecked.append(case)
            continue
        check_case(case, file_ending, channel_names, configuration, patch_dims, reader_class, previous_stage_folder)
        (refused if case.problems else good).append(case)
    return CheckedInputs(folder, good, refused, unchecked, output_folder, file_ending)


def _configuration_entry(plans: dict, configuration: str, key: str):
    """An entry of a configuration of plans.json, through 'inherits_from' as nnU-Net resolves it."""
    configurations = plans.get("configurations", {})
    entry, seen = configurations.get(configuration, {}), set()
    while key not in entry and "inherits_from" in entry and entry["inherits_from"] not in seen:
        seen.add(entry["inherits_from"])
        entry = configurations.get(entry["inherits_from"], {})
    return entry.get(key)


def _predicted(output_truncated: str, file_ending: str, save_probabilities: bool) -> bool:
    return os.path.isfile(output_truncated + file_ending) and (
        not save_probabilities or os.path.isfile(output_truncated + ".npz"))
