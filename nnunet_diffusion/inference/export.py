"""Write one predicted case so that no file under a final name is ever half-written.

nnU-Net's ``export_prediction_from_logits`` writes the segmentation (and probabilities) straight under their
final names, so a killed run can leave a truncated ``case.nii.gz`` that ``--continue_prediction`` then takes as
done. Here every file of a case is first written into ``<output folder>/.partial/`` and then moved into place
with ``os.replace`` (atomic on one file system), the segmentation last: a segmentation under its final name
means every other file of that case is complete.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_diffusion.inference.ensemble import UNCERTAINTY_MAPS

STAGING_FOLDER = ".partial"
MAPS_FOLDER = "uncertainty"


def check_maps_writable(plans_manager: PlansManager) -> None:
    """Uncertainty maps are float images written with SimpleITK; refuse other readers before the first case."""
    reader = plans_manager.image_reader_writer_class
    if not issubclass(reader, SimpleITKIO):
        raise ValueError(f"--uncertainty writes its maps with SimpleITK, in the geometry SimpleITKIO records, but this "
                         f"dataset is read with {reader.__name__}. Use a SimpleITK format (.nii.gz, .nrrd, .mha) "
                         f"with 'overwrite_image_reader_writer': 'SimpleITKIO' in dataset.json, or drop --uncertainty.")


def maps_in_input_geometry(maps: np.ndarray, properties: dict, configuration_manager: ConfigurationManager,
                           plans_manager: PlansManager) -> np.ndarray:
    """(M, *S) maps on the preprocessed grid -> (M, *input shape) on the input image's grid: resampled as nnU-Net
    resamples probabilities, the crop reverted (0 outside it: nnU-Net predicts background there without doubt)
    and the axes transposed back, the steps of nnU-Net's own export."""
    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current_spacing = configuration_manager.spacing
    if len(current_spacing) != len(properties["shape_after_cropping_and_before_resampling"]):  # 2d configurations
        current_spacing = [spacing[0], *current_spacing]
    resampled = np.asarray(configuration_manager.resampling_fn_probabilities(
        maps, properties["shape_after_cropping_and_before_resampling"], current_spacing, spacing), dtype=np.float32)
    full = np.zeros((maps.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
    full = insert_crop_into_image(full, resampled, properties["bbox_used_for_cropping"])
    return full.transpose([0] + [i + 1 for i in plans_manager.transpose_backward])


def write_float_image(array: np.ndarray, filename: str, properties: dict) -> None:
    """(x, y, z) float array -> an image with the input's spacing, origin and direction (as SimpleITKIO.write_seg)."""
    geometry = properties["sitk_stuff"]
    if len(geometry["spacing"]) == 2:
        array = array[0]
    image = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    if "original_orientation" in geometry:  # SimpleITKIOWithReorient read the image reoriented
        image = sitk.DICOMOrient(image, geometry["original_orientation"])
    sitk.WriteImage(image, filename, True)


def case_files(output_file_truncated: str, file_ending: str, save_probabilities: bool,
               map_names: Sequence[str] = (), maps_folder: str = MAPS_FOLDER) -> list:
    """Final paths of every file one case writes, the segmentation last (the order they are moved into place).
    The maps (``map_names``: ``UNCERTAINTY_MAPS`` with --uncertainty) go into the subfolder ``maps_folder``: beside
    the segmentations, nnUNetv2_evaluate_folder would take them for segmentations without a reference."""
    folder, case = os.path.split(output_file_truncated)
    maps = [os.path.join(folder, maps_folder, f"{case}_{name}{file_ending}") for name in map_names]
    probabilities = [output_file_truncated + ".npz", output_file_truncated + ".pkl"]
    return maps + (probabilities if save_probabilities else []) + [output_file_truncated + file_ending]


def export_case(logits: np.ndarray, maps: Optional[np.ndarray], properties: dict,
                configuration_manager: ConfigurationManager, plans_manager: PlansManager, dataset_json: dict,
                output_file_truncated: str, save_probabilities: bool, map_names: Sequence[str] = UNCERTAINTY_MAPS,
                maps_folder: str = MAPS_FOLDER) -> None:
    """Segmentation (+ probabilities, + maps) of one case, each written to the staging folder and then moved to its
    final path (``case_files``). logits (C, *S) and maps (M, *S) on the preprocessed grid, one per map name."""
    folder, case = os.path.split(output_file_truncated)
    staging = os.path.join(folder, STAGING_FOLDER)
    os.makedirs(staging, exist_ok=True)
    staged = os.path.join(staging, case)
    finals = case_files(output_file_truncated, dataset_json["file_ending"], save_probabilities,
                        map_names if maps is not None else (), maps_folder)
    export_prediction_from_logits(logits, properties, configuration_manager, plans_manager, dataset_json, staged,
                                  save_probabilities)
    if maps is not None:
        os.makedirs(os.path.join(folder, maps_folder), exist_ok=True)
        for final, image in zip(finals, maps_in_input_geometry(maps, properties, configuration_manager,
                                                               plans_manager)):
            write_float_image(image, os.path.join(staging, os.path.basename(final)), properties)
    for final in finals:
        os.replace(os.path.join(staging, os.path.basename(final)), final)
    try:
        os.rmdir(staging)  # only if empty: other cases (or parallel -part_id runs) may still be writing there
    except OSError:
        pass


def case_complete(output_file_truncated: str, file_ending: str, save_probabilities: bool,
                  map_names: Sequence[str] = (), maps_folder: str = MAPS_FOLDER) -> bool:
    """Whether every file this run would write for the case is already in place (--continue_prediction)."""
    return all(os.path.isfile(f) for f in case_files(output_file_truncated, file_ending, save_probabilities,
                                                     map_names, maps_folder))
