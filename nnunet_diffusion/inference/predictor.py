"""``DiffusionPredictor``: nnU-Net's predictor with batched test-time mirroring, uncertainty maps, sampler-level
progress and never-half-written outputs. Everything else (preprocessing, sliding windows, Gaussian weighting,
fold ensembling, resampling, --continue_prediction, -num_parts) is nnU-Net's ``nnUNetPredictor``.

What it overrides, and why:
- ``_internal_predict_sliding_window_return_logits`` and ``_internal_maybe_mirror_and_predict``: nnU-Net calls
  the network once per window and once more per mirrored copy; a diffusion network would run its whole sampler
  each time. Here several windows, all their mirrored copies and every sample go through one sampler run as one
  batch, of at most ``max_batch`` members.
  With maps (``map_names``: the uncertainty maps with --uncertainty; DSM's anomaly and prompt maps), the sliding
  window also accumulates them (same Gaussian weighting, float32), returned as extra channels after the logits (so
  fold averaging treats them alike).
- ``predict_from_data_iterator``: export through ``export.export_case`` (staged, then renamed) and the maps.
- ``_manage_input_and_output_lists``: a case is done only when all its files are (for --continue_prediction).
- ``_internal_get_data_iterator_from_lists_of_filenames``: ``-npp 0`` preprocesses in this process.
"""
from __future__ import annotations

import multiprocessing
import os
from time import sleep
from typing import Optional

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
from tqdm import tqdm

from nnunet_diffusion.architectures.segmenter import DiffusionSegmenter
from nnunet_diffusion.inference.ensemble import (UNCERTAINTY_MAPS, mirror_combinations, stack_mirrored,
                                                 uncertainty_maps, unflip)
from nnunet_diffusion.inference.export import MAPS_FOLDER, case_complete, check_maps_writable, export_case
from nnunet_diffusion.trainers.common.fault_safety import CheckpointError, read_checkpoint

# members (windows x mirrored copies x samples) per network call: a 3d window's 8 copies of one sample
DEFAULT_MAX_BATCH = 8


class DiffusionPredictor(nnUNetPredictor):
    """nnUNetPredictor plus: ``uncertainty`` (write the maps of ``ensemble.uncertainty_maps`` per case) and
    ``max_batch`` (members, i.e. windows x mirrored copies x samples, per network call). Works with any nnU-Net
    network; for a network without a sampler (the stock trainer's) the members are the mirrored copies."""

    def __init__(self, *args, uncertainty: bool = False, max_batch: int = DEFAULT_MAX_BATCH, **kwargs):
        super().__init__(*args, **kwargs)
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (members per network call), got {max_batch}")
        self.uncertainty = uncertainty
        self.max_batch = max_batch

    maps_folder = MAPS_FOLDER  # the subfolder of the output folder the maps are written to

    @property
    def map_names(self) -> tuple:
        """The maps written beside each segmentation, in channel order after the logits (file suffixes)."""
        return UNCERTAINTY_MAPS if self.uncertainty else ()

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds=None,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        """nnU-Net's, after reading every fold's checkpoint: a truncated, corrupted or foreign file (another
        trainer's than the folder's name says) stops here, naming the file and the fix."""
        if use_folds is None:
            use_folds = nnUNetPredictor.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        folder_trainer = os.path.basename(os.path.normpath(model_training_output_dir)).split("__")[0]
        for fold in ([use_folds] if isinstance(use_folds, str) else use_folds):
            path = os.path.join(model_training_output_dir, f"fold_{fold}", checkpoint_name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} does not exist: fold {fold} has not finished training (resume it "
                                        f"with nnUNetv2_train ... --c) or choose other folds with -f.")
            trainer = read_checkpoint(path)["trainer_name"]
            if trainer != folder_trainer:
                raise CheckpointError(f"{path} was written by {trainer}, but it lies in a model folder of "
                                      f"{folder_trainer}: the file was copied or moved there. Put it back into "
                                      f"{trainer}'s folder and predict with -tr {trainer}.")
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        if self.map_names:
            check_maps_writable(self.plans_manager)

    @property
    def unwrapped_network(self) -> torch.nn.Module:
        """``self.network`` without the torch.compile wrapper nnU-Net puts around it under ``nnUNet_compile=1``."""
        return getattr(self.network, "_orig_mod", self.network)

    @property
    def segmenter(self) -> Optional[DiffusionSegmenter]:
        """The diffusion segmenter behind ``self.network`` (also when compiled), or None for a plain network."""
        network = self.unwrapped_network
        return network if isinstance(network, DiffusionSegmenter) else None

    # ---- windows: several per network call, every mirrored copy and sample of them in one batch --------------

    def mirror_combinations(self):
        """The flips of each window's copies (``ensemble.mirror_combinations``): () alone without mirroring."""
        return mirror_combinations(self.allowed_mirroring_axes if self.use_mirroring else None)

    def samples_per_copy(self) -> int:
        segmenter = self.segmenter
        return segmenter.sampler.num_samples if segmenter is not None else 1

    def batch_per_copy(self) -> int:
        """Network batch members one window copy takes: its samples (UniSegDiff's staged sampler: its 2 chains,
        whatever the samples; they are drawn after the last network call)."""
        segmenter = self.segmenter
        return segmenter.network_batch_per_patch() if segmenter is not None else 1

    def windows_per_call(self) -> int:
        """How many sliding windows go through the network together: as many as fit ``max_batch`` members."""
        return max(1, self.max_batch // (len(self.mirror_combinations()) * self.batch_per_copy()))

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        """nnU-Net's sliding window (same windows, Gaussian weights and half-precision accumulation), but
        ``windows_per_call`` windows per network call: with a sampler inside, each call is a whole reverse loop,
        and small windows (2d) keep a CPU or GPU busy only in batches."""
        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        heads, shape = self.label_manager.num_segmentation_heads, data.shape[1:]
        logits = torch.zeros((heads, *shape), dtype=torch.half, device=results_device)
        weights = torch.zeros(shape, dtype=torch.half, device=results_device)
        gaussian = self._gaussian(torch.half, results_device)
        if self.map_names:
            # logits accumulate in half precision as in nnU-Net (so segmentations match nnUNetv2_predict's); the maps
            # cannot: at a 3d window's corners the Gaussian weights (~1e-10) fall below half's subnormals and the
            # weighted mean comes out wrong (seen: entropy 2.0 > log 5). They accumulate in float32.
            maps = torch.zeros((len(self.map_names), *shape), dtype=torch.float32, device=results_device)
            map_weights = torch.zeros(shape, dtype=torch.float32, device=results_device)
            map_gaussian = self._gaussian(torch.float32, results_device)
        per_call = self.windows_per_call()
        with tqdm(total=len(slicers), disable=not self.allow_tqdm) as bar:
            for start in range(0, len(slicers), per_call):
                group = slicers[start:start + per_call]
                windows = torch.stack([data[sl] for sl in group]).to(self.device)
                for sl, output in zip(group, self._internal_maybe_mirror_and_predict(windows).to(results_device)):
                    logits[sl] += output[:heads] * gaussian
                    weights[sl[1:]] += gaussian
                    if self.map_names:
                        maps[sl] += output[heads:] * map_gaussian
                        map_weights[sl[1:]] += map_gaussian
                bar.update(len(group))
        torch.div(logits, weights, out=logits)
        if torch.isinf(logits).any():
            raise RuntimeError("Encountered inf in the predicted array (half-precision accumulation overflowed).")
        if not self.map_names:
            return logits
        return torch.cat([logits.float(), maps / map_weights])

    def _gaussian(self, dtype: torch.dtype, device: torch.device):
        """nnU-Net's window weights (or 1 without Gaussian weighting)."""
        if not self.use_gaussian:
            return 1
        return compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                value_scaling_factor=10, dtype=dtype, device=device)

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """(G, C_img, *P) windows -> (G, C [+ maps], *P): each window's copies' logits averaged as nnU-Net averages
        them (the mean of each copy's logits), then, with ``uncertainty``, the maps over all its members."""
        combinations = self.mirror_combinations()
        if self.use_mirroring and combinations[-1] and max(combinations[-1]) > x.ndim - 1:
            raise ValueError(f"mirror axes {self.allowed_mirroring_axes} do not fit a {x.ndim - 2}d window")
        copies, windows = len(combinations), x.shape[0]
        logits, members = self._predict_batch(stack_mirrored(x, combinations))
        logits = unflip(logits.reshape(copies, windows, *logits.shape[1:]), combinations, extra_dims=1).mean(dim=0)
        if not self.uncertainty:
            return logits
        members = unflip(members.reshape(copies, windows, *members.shape[1:]), combinations, extra_dims=2)
        members = members.transpose(0, 1).flatten(1, 2)  # (G, copies * samples, C, *P)
        maps = torch.stack([uncertainty_maps(m) for m in members])
        return torch.cat([logits, maps.to(logits.dtype)], dim=1)

    def _predict_batch(self, batch: torch.Tensor):
        """(N, C_img, *P) windows and copies -> their logits (N, C, *P) and member probabilities (N, M, C, *P; None
        for a plain network without ``uncertainty``), in chunks of at most ``max_batch`` members. Every window and
        copy starts from the seed's noise, as each of nnU-Net's one-window calls does, so a deterministic sampler
        gives what nnU-Net's loop gives."""
        segmenter = self.segmenter
        chunks = list(torch.split(batch, max(1, self.max_batch // self.batch_per_copy())))
        logits, members = [], []
        steps = segmenter.network_calls() if segmenter is not None else 0
        with tqdm(total=steps * len(chunks), desc="sampler steps", leave=False, position=1,
                  disable=not self.allow_tqdm or segmenter is None) as bar:
            for part in chunks:
                part_logits, part_members = self._predict_chunk(part, bar)
                logits.append(part_logits)
                if part_members is not None:
                    members.append(part_members)
        return torch.cat(logits), (torch.cat(members) if members else None)

    def _predict_chunk(self, part: torch.Tensor, bar):
        """One network call on (n, C_img, *P) windows and copies -> (logits, members or None). Out of memory, the
        chunk is split in halves (each member's noise depends only on the seed, so the result changes only by the
        rounding of kernels run on a smaller batch) and ``max_batch`` lowered for the rest of the run; one window that does not fit raises with what to change."""
        try:
            segmenter = self.segmenter
            if segmenter is None:
                out = self.network(part)
                # only the uncertainty maps need a plain network's members
                return out, (torch.softmax(out.float(), dim=1)[:, None] if self.uncertainty else None)
            probabilities = segmenter.member_probabilities(part, copies=part.shape[0],
                                                           on_step=lambda k, x0_hat: bar.update())
            return segmenter.fuse(probabilities), probabilities
        except torch.OutOfMemoryError:
            if part.shape[0] == 1:
                raise MemoryError(
                    f"One window of {list(part.shape[2:])} voxels with {self.samples_per_copy()} sample(s) does not "
                    f"fit in {self.device.type.upper()} memory. Predict with fewer --samples, or on another device "
                    f"(-device cpu).") from None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = (part.shape[0] + 1) // 2
            self.max_batch = max(1, min(self.max_batch, half * self.batch_per_copy()))
            print(f"Out of memory with {part.shape[0]} windows/copies per network call: splitting; --max_batch is "
                  f"now {self.max_batch} for this run.")
            results, start = [], 0
            while start < part.shape[0]:  # in pieces of the (possibly lowered again) max_batch
                size = max(1, self.max_batch // self.batch_per_copy())
                results.append(self._predict_chunk(part[start:start + size], bar))
                start += size
            members = [m for _, m in results if m is not None]
            return torch.cat([l for l, _ in results]), (torch.cat(members) if members else None)

    # ---- which cases to predict, and how they are read and written -------------------------------------------

    def _manage_input_and_output_lists(self, list_of_lists_or_source_folder, output_files,
                                       folder_with_segs_from_prev_stage=None, overwrite=True, part_id=0, num_parts=1,
                                       save_probabilities=False):
        inputs, outputs, previous = super()._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_files, folder_with_segs_from_prev_stage, True, part_id, num_parts,
            save_probabilities)
        if overwrite or outputs is None:
            return inputs, outputs, previous
        todo = [i for i, out in enumerate(outputs) if not case_complete(
            out, self.dataset_json["file_ending"], save_probabilities, self.map_names, self.maps_folder)]
        print(f"--continue_prediction: {len(outputs) - len(todo)} cases are complete, "
              f"predicting the other {len(todo)}.")
        return [inputs[i] for i in todo], [outputs[i] for i in todo], [previous[i] for i in todo]

    def _internal_get_data_iterator_from_lists_of_filenames(self, input_list_of_lists, seg_from_prev_stage_files,
                                                            output_filenames_truncated, num_processes: int):
        if num_processes > 0:
            return super()._internal_get_data_iterator_from_lists_of_filenames(
                input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated, num_processes)
        return self._preprocess_here(input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated)

    def _preprocess_here(self, inputs, previous_stage, outputs):
        """-npp 0: preprocess each case in this process, when it is needed (no worker processes)."""
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose_preprocessing)
        label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        for i, files in enumerate(inputs):
            prev = previous_stage[i] if previous_stage is not None else None
            data, seg, properties = preprocessor.run_case(files, prev, self.plans_manager,
                                                          self.configuration_manager, self.dataset_json)
            if prev is not None:
                data = np.vstack((data, convert_labelmap_to_one_hot(seg[0], label_manager.foreground_labels,
                                                                    data.dtype)))
            yield {"data": torch.from_numpy(data), "data_properties": properties,
                   "ofile": outputs[i] if outputs is not None else None}

    def predict_from_files_sequential(self, list_of_lists_or_source_folder, output_files, save_probabilities=False,
                                      overwrite=True, folder_with_segs_from_prev_stage=None):
        """nnU-Net's no-multiprocessing path, through our export: ``predict_from_files`` with -npp 0 -nps 0."""
        return self.predict_from_files(list_of_lists_or_source_folder, output_files, save_probabilities, overwrite,
                                       0, 0, folder_with_segs_from_prev_stage)

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = default_num_processes):
        """Predict every case of ``data_iterator`` and export it with ``export_case`` (in up to
        ``num_processes_segmentation_export`` worker processes; 0: in this process). Cases without 'ofile' are
        returned (segmentation[, probabilities]) as nnU-Net's predictor returns them."""
        pool = (multiprocessing.get_context("spawn").Pool(num_processes_segmentation_export)
                if num_processes_segmentation_export > 0 else None)
        pending, results = [], []
        try:
            for item in data_iterator:
                data = item["data"]
                if isinstance(data, str):  # nnU-Net's preprocessing workers may hand over large cases as .npy
                    path, data = data, torch.from_numpy(np.load(data))
                    os.remove(path)
                ofile, properties = item["ofile"], item["data_properties"]
                print(f"\nPredicting {os.path.basename(ofile) if ofile else f'image of shape {tuple(data.shape)}'}:")
                output = self.predict_logits_from_preprocessed_data(data).cpu().numpy()
                heads = self.label_manager.num_segmentation_heads
                logits, maps = output[:heads], (output[heads:].astype(np.float32) if self.map_names else None)
                if ofile is None:
                    results.append(convert_predicted_logits_to_segmentation_with_correct_shape(
                        logits, self.plans_manager, self.configuration_manager, self.label_manager, properties,
                        save_probabilities))
                    continue
                job = (logits, maps, properties, self.configuration_manager, self.plans_manager, self.dataset_json,
                       ofile, save_probabilities, self.map_names, self.maps_folder)
                if pool is None:
                    export_case(*job)
                    continue
                pending.append(pool.apply_async(export_case, job))
                while sum(not p.ready() for p in pending) > 2:  # bound the exports waiting in memory
                    sleep(0.1)
                for done in [p for p in pending if p.ready()]:
                    done.get()  # re-raises an export error now, not after every case was predicted
                    pending.remove(done)
            for p in pending:
                p.get()
        except BaseException:
            if pool is not None:
                pool.terminate()  # a killed export leaves only its staging files, never a final-named one
            raise
        if pool is not None:
            pool.close()
            pool.join()
        return results
