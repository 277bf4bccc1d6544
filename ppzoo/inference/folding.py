"""Fold proteins with a trained HelixFold checkpoint: features in; PDB, JSON and pLDDT plot out.

    fold_file(checkpoint, "T1026.fasta", out_dir, recycles=3, chunk_size=64, num_predictions=2)

Input is a FASTA file (single-sequence mode), an AlphaFold2 raw-features .npz (with its MSA and templates),
or a PDB/mmCIF whose sequence is folded; never a pickle (see ppzoo.data.protein.load_user_input). Each
prediction samples its own MSA clusters and BERT masks (feature seed = its number) and all of them are ranked
by mean pLDDT, as AlphaFold2 ranks its models:

    out_dir/ranked_0.pdb ...           the predictions, best first, pLDDT (0-100) in the B-factor column
    out_dir/ranking.json               mean pLDDT of each prediction and the order
    out_dir/prediction.json            sequence, per-residue pLDDT of the best prediction, mean pLDDT, ranking
    out_dir/plddt.png                  pLDDT along the sequence, every prediction (the best one bold)

`checkpoint` may also be a model exported by tools/export.py (ppzoo.inference.folding_export): the same
features go through the Paddle Inference program instead of the eager model.
"""
import json
import os
from dataclasses import dataclass

import numpy as np

from ppzoo.data.protein import residue_constants as rc
from ppzoo.data.protein.pdb_writer import with_residue_b_factors, write_pdb
from ppzoo.data.protein.structure import Protein
from ppzoo.errors import CheckpointError, DataError

# AF2's pLDDT bands (the colors of its confidence plots): very high, confident, low, very low.
PLDDT_BANDS = ((90.0, (0, 83, 214)), (70.0, (101, 203, 243)), (50.0, (255, 219, 19)), (0.0, (255, 125, 69)))


@dataclass
class FoldingOptions:
    recycles: int = None  # None: the checkpoint's Model.num_recycle
    # Dynamic axial parallelism: this many launched processes split the Evoformer and extra MSA stacks of one
    # protein (ppzoo.distributed.axial_parallel; the caller initializes the distributed environment).
    dap_degree: int = 1
    chunk_size: int = None  # attention and transitions over this many rows at a time (lower peak memory)
    num_predictions: int = 1
    max_msa_clusters: int = None  # None: the checkpoint's Data.Eval (else Data.Train) setting
    max_extra_msa: int = None
    max_templates: int = None


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_folding_checkpoint(path, chunk_size=None):
    """(HelixFold module in eval mode, config) from a checkpoint directory or a run's output directory.

    chunk_size overrides Model.chunk_size: it changes only how the computation is split, not the weights."""
    from ppzoo.config import config_from_dict
    from ppzoo.core import checkpoint as ckpt
    from ppzoo.inference.loading import merged_state_dict
    from ppzoo.registry import MODULES

    if os.path.isdir(path) and not os.path.exists(os.path.join(path, ckpt.MANIFEST)) and ckpt.list_checkpoints(path):
        path = ckpt.list_checkpoints(path)[-1]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint directory (expected output_dir/step_XXXXXXXX).")
    ckpt.verify(path)
    state = ckpt.read_trainer_state(path)
    cfg = config_from_dict(state["config"], source=os.path.join(path, ckpt.TRAINER_STATE))
    if cfg.model_module != "HelixFold":
        raise CheckpointError(f"{path} holds a {cfg.model_module} model, not a HelixFold one: it cannot fold.")
    if chunk_size is not None:
        if chunk_size < 1:
            raise DataError(f"--chunk-size must be a positive number of rows, got {chunk_size}.")
        cfg.Model.chunk_size = chunk_size
    module = MODULES.get(cfg.model_module)(cfg.Model, None)
    module.set_state_dict(merged_state_dict(path, module, state.get("mp_size", 1)))
    module.eval()
    return module, cfg


def feature_config(cfg, options, num_residues):
    """The pipeline settings for inference: the whole chain (no crop), the checkpoint's MSA sizes."""
    from ppzoo.data.protein.pipeline import FeatureConfig

    data = (cfg.Data.Eval or cfg.Data.Train) if cfg.Data is not None else None
    args = getattr(data, "args", None)

    def pick(name, default):
        value = getattr(options, name)
        if value is not None:
            return value
        return getattr(args, name, default) if args is not None else default

    return FeatureConfig(crop_size=num_residues, max_msa_clusters=pick("max_msa_clusters", 16),
                         max_extra_msa=pick("max_extra_msa", 32), max_templates=pick("max_templates", 4),
                         training=False)


def load_input(path):
    """Raw features of the protein in a FASTA, features .npz or PDB/mmCIF file, and its name."""
    from ppzoo.data.protein.raw_features import load_user_input

    if not os.path.isfile(str(path)):
        raise DataError(f"{path}: no such file (expected a FASTA, a features .npz or a PDB/mmCIF file).")
    raw = load_user_input(path)
    name = os.path.basename(str(path)).split(".")[0]
    return raw, name


# ----------------------------------------------------------------------------------------------------------
# Folding


def predict(module, example, recycles):
    """One forward of the model on one example (numpy, no batch dimension) -> numpy outputs."""
    import paddle

    from ppzoo.models.helixfold.heads import plddt_from_logits

    batch = {key: paddle.to_tensor(np.asarray(value)[None]) for key, value in example.items()}
    with paddle.no_grad():
        outputs = module.model(batch, num_recycle=recycles)
        plddt = plddt_from_logits(outputs["plddt_logits"])
    return {
        "atom37_positions": outputs["final_atom37_positions"].numpy()[0],
        "atom37_mask": outputs["final_atom37_mask"].numpy()[0],
        "plddt": plddt.numpy()[0],
    }


def prediction_to_protein(example, prediction, name):
    """The predicted structure as a Protein: residues numbered from 1, pLDDT as every atom's B-factor. Padding
    residues (seq_mask 0, added to make the length divisible for axial parallelism) are left out."""
    n = int(np.sum(example["seq_mask"]))
    aatype = np.asarray(example["aatype"])[:n]
    mask = prediction["atom37_mask"][:n] * rc.restype_atom37_mask[aatype]
    protein = Protein(aatype=aatype, atom_positions=prediction["atom37_positions"][:n].astype(np.float32),
                      atom_mask=mask.astype(np.float32),
                      residue_index=np.asarray(example["residue_index"])[:n] - int(example["residue_index"][0]) + 1,
                      b_factors=np.zeros_like(mask, dtype=np.float32), name=name)
    return with_residue_b_factors(protein, prediction["plddt"][:n])


def fold(predict_fn, cfg, raw, name, options: FoldingOptions):
    """Fold one protein options.num_predictions times with predict_fn(example, recycles) (the eager model or
    an exported program); returns the predictions ranked by mean pLDDT: [{"seed", "protein", "plddt",
    "mean_plddt"}], best first."""
    from ppzoo.data.protein.pipeline import make_example

    if options.num_predictions < 1:
        raise DataError(f"--num-predictions must be at least 1, got {options.num_predictions}.")
    recycles = cfg.Model.num_recycle if options.recycles is None else options.recycles
    if recycles < 0:
        raise DataError(f"--recycles must be 0 or more, got {recycles}.")
    n = len(raw["aatype"])
    padded = -(-n // options.dap_degree) * options.dap_degree  # masked padding residues to split evenly
    fcfg = feature_config(cfg, options, padded)
    predictions = []
    for seed in range(options.num_predictions):
        example = make_example(raw, fcfg, seed)
        prediction = predict_fn(example, recycles)
        protein = prediction_to_protein(example, prediction, name)
        plddt = prediction["plddt"][:n]
        predictions.append({"seed": seed, "protein": protein, "plddt": plddt, "mean_plddt": float(np.mean(plddt))})
    return sorted(predictions, key=lambda p: -p["mean_plddt"])


# ----------------------------------------------------------------------------------------------------------
# Outputs


def plddt_band(value):
    for lower, color in PLDDT_BANDS:
        if value >= lower:
            return color
    return PLDDT_BANDS[-1][1]


def plot_plddt(curves, path, title=""):
    """pLDDT along the sequence as a PNG (Pillow): one line per curve, the first drawn bold and its points
    colored by AF2's confidence bands. curves: [(label, values [N])]."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 900, 420, 60, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=13)  # Pillow >= 10.1 scales its built-in font
    except TypeError:
        font = ImageFont.load_default()
    n = max(len(values) for _, values in curves)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(i, value):
        x = left + (plot_w * i / max(n - 1, 1))
        return x, top + plot_h * (1.0 - float(np.clip(value, 0, 100)) / 100.0)

    for lower, color in PLDDT_BANDS[:-1]:  # band edges as light lines
        y = xy(0, lower)[1]
        draw.line([(left, y), (left + plot_w, y)], fill=tuple(int(c + (255 - c) * 0.6) for c in color), width=1)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for value in range(0, 101, 20):
        y = xy(0, value)[1]
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((left - 30, y - 7), f"{value}", fill="black", font=font)
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, n) if n / s <= 12)
    for i in range(0, n, step):
        x = xy(i, 0)[0]
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill="black")
        draw.text((x - 8, top + plot_h + 6), f"{i + 1}", fill="black", font=font)
    for rank, (label, values) in reversed(list(enumerate(curves))):
        points = [xy(i, v) for i, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=(0, 0, 0) if rank == 0 else (160, 160, 160), width=2 if rank == 0 else 1)
        if rank == 0:
            for (x, y), v in zip(points, values):
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=plddt_band(v))
    draw.text((left, 12), title or "pLDDT along the sequence", fill="black", font=font)
    draw.text((left + plot_w / 2 - 30, height - 22), "residue", fill="black", font=font)
    draw.text((6, top - 20), "pLDDT", fill="black", font=font)
    image.save(path, format="PNG")
    return path


def write_outputs(predictions, name, out_dir, settings=None):
    """ranked_*.pdb, ranking.json, prediction.json and plddt.png in out_dir; returns the summary dict."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"pdb": []}
    for rank, prediction in enumerate(predictions):
        files["pdb"].append(write_pdb(prediction["protein"], os.path.join(out_dir, f"ranked_{rank}.pdb")))
    ranking = {"order": [f"prediction_{p['seed']}" for p in predictions],
               "mean_plddt": {f"prediction_{p['seed']}": p["mean_plddt"] for p in predictions}}
    files["ranking"] = os.path.join(out_dir, "ranking.json")
    with open(files["ranking"], "w") as f:
        json.dump(ranking, f, indent=2)
    best = predictions[0]
    files["png"] = plot_plddt([(f"prediction_{p['seed']}", p["plddt"]) for p in predictions],
                              os.path.join(out_dir, "plddt.png"),
                              title=f"{name}: pLDDT, mean {best['mean_plddt']:.1f} (best of {len(predictions)})")
    summary = {
        "name": name,
        "sequence": best["protein"].sequence,
        "mean_plddt": best["mean_plddt"],
        "plddt": [round(float(v), 2) for v in best["plddt"]],
        "ranking": ranking,
        "settings": settings or {},
    }
    files["json"] = os.path.join(out_dir, "prediction.json")
    with open(files["json"], "w") as f:
        json.dump(summary, f, indent=2)
    return {**summary, "files": files}


def fold_file(checkpoint, input_path, out_dir, options: FoldingOptions = None):
    """Fold the input file with a checkpoint (eager) or an exported model directory (Paddle Inference) and
    write the outputs; returns the summary dict."""
    from ppzoo.inference.folding_export import ExportedFolder, is_exported_folding_model

    options = options or FoldingOptions()
    raw, name = load_input(input_path)
    if is_exported_folding_model(checkpoint):
        if options.chunk_size is not None:
            raise DataError("--chunk-size applies to checkpoints (eager); an exported program runs unchunked.")
        if options.dap_degree > 1:
            raise DataError("--dap-degree applies to checkpoints (eager); an exported program runs on one process.")
        folder = ExportedFolder(checkpoint)
        cfg, predict_fn = folder.cfg, folder.predict
        recycles = folder.recycles if options.recycles is None else options.recycles
        options = FoldingOptions(**{**options.__dict__, "recycles": recycles})
    else:
        module, cfg = load_folding_checkpoint(checkpoint, options.chunk_size)
        if options.dap_degree > 1:
            from ppzoo.distributed.axial_parallel import new_axial_parallel

            axial = new_axial_parallel(options.dap_degree)
            iteration = module.model.iteration
            for stack in (iteration.evoformer, iteration.extra_msa_stack):
                if stack is not None:
                    stack.axial = axial
        predict_fn = lambda example, recycles: predict(module, example, recycles)  # noqa: E731
    predictions = fold(predict_fn, cfg, raw, name, options)
    settings = {"checkpoint": str(checkpoint), "input": str(input_path),
                "recycles": cfg.Model.num_recycle if options.recycles is None else options.recycles,
                "chunk_size": cfg.Model.chunk_size, "num_predictions": options.num_predictions,
                "exported": is_exported_folding_model(checkpoint), "dap_degree": options.dap_degree}
    if int(os.environ.get("PADDLE_TRAINER_ID", "0")) != 0:  # axial parallelism: the first process writes
        return {"name": name, "mean_plddt": predictions[0]["mean_plddt"], "settings": settings}
    return write_outputs(predictions, name, out_dir, settings)


__all__ = ["FoldingOptions", "load_folding_checkpoint", "load_input", "fold", "predict", "write_outputs",
           "fold_file", "plot_plddt", "prediction_to_protein"]
