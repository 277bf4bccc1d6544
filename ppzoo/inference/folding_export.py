"""Export HelixFold as a Paddle inference program, and fold with it (tools/export.py, tools/infer.py --model).

What is traced: the whole model for one input (embedders, templates, extra MSA stack, Evoformer, structure
module, heads) with a fixed number of recycles unrolled into the program, the number of residues dynamic
and the MSA, extra MSA and template counts fixed at the sizes the feature pipeline pads to (they are stored
in ppzoo.json and used when features are made for the program). Outputs: atom37 positions, their mask and
per-residue pLDDT.

What stays eager, and why: the number of recycles (a Python loop in the model; the program holds one
count, export again for another), chunking (`chunk_size` splits tensors in Python loops over the residue
axis, whose length is dynamic in the program: export without it), and the feature pipeline (MSA sampling,
clustering and BERT masking in NumPy) with the output writers.

Files: model.json + model.pdiparams (the program), ppzoo.json (format, training config, recycles, feature
sizes, input names in order, file sizes and SHA-256).
"""
import os
import shutil
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec

from ppzoo.config import config_from_dict, config_to_dict
from ppzoo.errors import PpzooError
from ppzoo.inference.export import (METADATA_FILE, PROGRAM_PREFIX, exported_format, move_into_place,
                                    prepare_destination, read_metadata, verify_files, write_metadata)
from ppzoo.models.helixfold.heads import plddt_from_logits

FORMAT = "ppzoo-exported-helixfold"
FORMAT_VERSION = 1
# The model's inputs in the program's order: (name, dtype, shape without the batch axis; N residues, S MSA
# clusters, E extra sequences, T templates).
INPUTS = (
    ("aatype", "int64", ("N",)), ("residue_index", "int64", ("N",)), ("seq_mask", "float32", ("N",)),
    ("target_feat", "float32", ("N", 22)), ("msa_feat", "float32", ("S", "N", 49)),
    ("msa_mask", "float32", ("S", "N")), ("extra_msa", "int64", ("E", "N")),
    ("extra_msa_mask", "float32", ("E", "N")), ("extra_has_deletion", "float32", ("E", "N")),
    ("extra_deletion_value", "float32", ("E", "N")), ("template_aatype", "int64", ("T", "N")),
    ("template_all_atom_positions", "float32", ("T", "N", 37, 3)),
    ("template_all_atom_masks", "float32", ("T", "N", 37)), ("template_mask", "float32", ("T",)),
    ("template_pseudo_beta", "float32", ("T", "N", 3)), ("template_pseudo_beta_mask", "float32", ("T", "N")),
)
OUTPUTS = ("atom37_positions", "atom37_mask", "plddt")


class FoldingProgram(nn.Layer):
    """The traced forward: the model's feature tensors as named arguments (paddle.jit needs them spelled
    out) -> (atom37 positions [1, N, 37, 3], atom37 mask [1, N, 37], pLDDT [1, N])."""

    def __init__(self, model, recycles):
        super().__init__()
        self.model, self.recycles = model, recycles

    def forward(self, aatype, residue_index, seq_mask, target_feat, msa_feat, msa_mask, extra_msa, extra_msa_mask,
                extra_has_deletion, extra_deletion_value, template_aatype, template_all_atom_positions,
                template_all_atom_masks, template_mask, template_pseudo_beta, template_pseudo_beta_mask):
        given = locals()
        batch = {name: given[name] for name, _, _ in INPUTS}
        outputs = self.model(batch, num_recycle=self.recycles)
        return (outputs["final_atom37_positions"], outputs["final_atom37_mask"],
                plddt_from_logits(outputs["plddt_logits"]))


def input_spec(sizes):
    """InputSpecs with the residue axis dynamic and S, E, T from `sizes`."""
    def dim(d):
        return -1 if d == "N" else sizes.get(d, d)
    return [InputSpec([1] + [dim(d) for d in shape], dtype, name=name) for name, dtype, shape in INPUTS]


def export_folding(module, cfg, out_dir, recycles=None, check=True):
    """Export a HelixFold module (eval mode, weights loaded) with its run config to out_dir; returns
    {file name: bytes}. With check=True the saved program folds a short test sequence and must reproduce
    the eager model."""
    from ppzoo.inference.folding import FoldingOptions, feature_config

    if cfg.Model.chunk_size is not None:
        raise PpzooError(f"Model.chunk_size={cfg.Model.chunk_size}: chunking is a Python loop over the residues, "
                         "which are dynamic in the exported program; export without it (chunking changes memory, "
                         "not results).")
    recycles = cfg.Model.num_recycle if recycles is None else recycles
    fcfg = feature_config(cfg, FoldingOptions(), 1)
    sizes = {"S": fcfg.max_msa_clusters, "E": fcfg.max_extra_msa, "T": fcfg.max_templates}
    out_dir = Path(out_dir).expanduser().resolve()
    prepare_destination(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    program = FoldingProgram(module.model, recycles)
    program.eval()
    try:
        static = paddle.jit.to_static(program, input_spec=input_spec(sizes), full_graph=True)
        paddle.jit.save(static, str(tmp / PROGRAM_PREFIX))
        files = [f"{PROGRAM_PREFIX}.json", f"{PROGRAM_PREFIX}.pdiparams"]
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "paddle_version": paddle.__version__,
                    "program": {"model": files[0], "params": files[1]}, "config": config_to_dict(cfg),
                    "recycles": recycles, "sizes": sizes, "inputs": [name for name, _, _ in INPUTS],
                    "outputs": list(OUTPUTS)}
        write_metadata(tmp, metadata, files)
        if check:
            _self_check(module, cfg, str(tmp), recycles)
        written = {name: os.path.getsize(tmp / name) for name in sorted(os.listdir(tmp))}
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def _self_check(module, cfg, directory, recycles):
    from ppzoo.data.protein.pipeline import make_example
    from ppzoo.data.protein.raw_features import single_sequence_features
    from ppzoo.inference.folding import FoldingOptions, feature_config, predict

    raw = single_sequence_features("MQIFVKTLTGKTITLEVEPS")
    exported = ExportedFolder(directory)
    example = make_example(raw, feature_config(exported.cfg, FoldingOptions(), len(raw["aatype"])), 0)
    got, want = exported.predict(example), predict(module, example, recycles)
    error = float(np.max(np.abs(got["atom37_positions"] - want["atom37_positions"])))
    if error > 1e-3:
        raise RuntimeError(f"the exported program's coordinates differ from the eager model's by {error:.2e} A")


class ExportedFolder:
    """An exported HelixFold program behind the same predict(example) as the eager model (ppzoo.inference
    .folding.predict), with the config and recycles it was exported with."""

    def __init__(self, model_dir, threads=None, verify=True):
        from paddle import inference

        from ppzoo.inference.predictor import _gpu_available, default_threads

        self.model_dir = str(model_dir)
        self.metadata = read_folding_metadata(self.model_dir)
        verify_files(self.model_dir, self.metadata, checksums=verify)
        self.cfg = config_from_dict(self.metadata["config"], source=os.path.join(self.model_dir, METADATA_FILE))
        self.recycles = self.metadata["recycles"]
        config = inference.Config(os.path.join(self.model_dir, self.metadata["program"]["model"]),
                                  os.path.join(self.model_dir, self.metadata["program"]["params"]))
        if _gpu_available():  # the same capability check as the language-model Predictor
            config.enable_use_gpu(256, 0)
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(threads or default_threads())
            # oneDNN's fusion passes reject this program in Paddle 3.3 (a reshape they rewrite keeps its old
            # rank: "type tensor<1xNxNx1> ... must be equal to tensor<1xNxN>"); the plain CPU kernels run it.
            config.disable_onednn()
        config.disable_glog_info()
        self._predictor = inference.create_predictor(config)

    def predict(self, example, recycles=None):
        if recycles is not None and recycles != self.recycles:
            raise PpzooError(f"{self.model_dir} was exported with {self.recycles} recycles; fold with "
                             f"--recycles {self.recycles} or export again with --recycles {recycles}.")
        predictor = self._predictor
        for handle_name, name in zip(predictor.get_input_names(), self.metadata["inputs"]):
            value = np.ascontiguousarray(np.asarray(example[name])[None])
            handle = predictor.get_input_handle(handle_name)
            handle.reshape(list(value.shape))
            handle.copy_from_cpu(value)
        predictor.run()
        values = [predictor.get_output_handle(n).copy_to_cpu()[0] for n in predictor.get_output_names()]
        return dict(zip(OUTPUTS, values))


def read_folding_metadata(model_dir):
    return read_metadata(model_dir, FORMAT, FORMAT_VERSION, required=("program", "files", "config", "recycles",
                                                                      "inputs"))


def is_exported_folding_model(model_dir):
    return exported_format(model_dir) == FORMAT
