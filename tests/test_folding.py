"""Folding from the command line (tools/infer.py --fold) with a HelixFold checkpoint trained here for two
steps: FASTA and features .npz in; ranked PDBs with pLDDT B-factors, ranking and prediction JSON, pLDDT plot
out. Checked against the model itself: the written coordinates and pLDDT are the model's outputs, chunking
gives the same structure, the ranking is by mean pLDDT, and the PDB scores against a native with the
structure metrics.
"""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, last_json_line, run_tool
from ppzoo.data.protein import residue_constants as rc
from ppzoo.data.protein.pipeline import make_example
from ppzoo.data.protein.raw_features import save_features_npz
from ppzoo.data.protein.structure import read_chain
from ppzoo.eval.structure import score_files
from ppzoo.inference.folding import FoldingOptions, feature_config, load_folding_checkpoint, load_input, predict

SHARED = REPO_ROOT.parent / "shared" / "data" / "proteins"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/proteins is absent (shared test data)")
CA = rc.atom_order["CA"]
UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("helixfold")
    overrides = ["Engine.max_steps=2", "Engine.save_steps=2", "Engine.eval_freq=0", "Engine.progress_bar=false",
                 f"Engine.output_dir={out}", "Global.global_batch_size=1", "Global.micro_batch_size=1",
                 "Data.Train.crop_size=24", "Data.Train.max_msa_clusters=4", "Data.Train.max_extra_msa=8",
                 "Data.Eval.max_msa_clusters=4", "Data.Eval.max_extra_msa=8", "Data.Eval.max_templates=2"]
    done = run_tool("train", ["-c", REPO_ROOT / "configs" / "helixfold" / "tiny.yaml",
                              *[a for o in overrides for a in ("-o", o)]])
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(last_json_line(done.stdout)["checkpoint"])


def test_fold_a_fasta_from_the_command_line(checkpoint, tmp_path):
    fasta = tmp_path / "ubiquitin.fasta"
    fasta.write_text(f">ubiquitin\n{UBIQUITIN}\n")
    done = run_tool("infer", ["--ckpt", checkpoint, "--fold", fasta, "--recycles", "1", "--chunk-size", "16",
                              "--num-predictions", "2", "--out", tmp_path / "out"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = last_json_line(done.stdout)
    summary = json.loads((tmp_path / "out" / "prediction.json").read_text())
    ranking = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert summary["sequence"] == result["sequence"] == UBIQUITIN
    assert summary["settings"]["recycles"] == 1 and summary["settings"]["chunk_size"] == 16
    scores = [ranking["mean_plddt"][name] for name in ranking["order"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert summary["mean_plddt"] == pytest.approx(scores[0]) == pytest.approx(np.mean(summary["plddt"]), abs=0.01)
    best = read_chain(tmp_path / "out" / "ranked_0.pdb")
    assert best.sequence == UBIQUITIN and list(best.residue_index) == list(range(1, 77))
    np.testing.assert_allclose(best.b_factors[:, CA], summary["plddt"], atol=0.006)
    assert np.all(best.atom_mask == rc.restype_atom37_mask[best.aatype])  # every atom of each residue type
    with Image.open(tmp_path / "out" / "plddt.png") as image:
        assert image.format == "PNG" and image.size == (900, 420)
    # the predicted file scores against the native with the structure metrics (residues paired by number)
    scored = score_files(tmp_path / "out" / "ranked_0.pdb", SHARED / "pdb" / "pdb1ubi.pdb")
    assert scored["correspondence"] == "numbering" and scored["aligned_residues"] == 76
    assert 0.0 < scored["tm_score"] <= 1.0 and 0.0 <= scored["lddt_ca"] <= 1.0


def test_written_structure_is_the_models_output_and_chunking_changes_nothing(checkpoint, tmp_path):
    fasta = tmp_path / "crambin.fasta"
    fasta.write_text(">crambin\nTTCCPSIVARSNFNVCRLPGTPEALCATYTGCIIIPGATCPGDYAN\n")
    raw, _ = load_input(fasta)
    module, cfg = load_folding_checkpoint(checkpoint)
    chunked, _ = load_folding_checkpoint(checkpoint, chunk_size=7)
    example = make_example(raw, feature_config(cfg, FoldingOptions(), len(raw["aatype"])), 0)
    plain, split = predict(module, example, 1), predict(chunked, example, 1)
    np.testing.assert_allclose(split["atom37_positions"], plain["atom37_positions"], atol=1e-4)
    np.testing.assert_allclose(split["plddt"], plain["plddt"], atol=1e-4)
    assert not np.allclose(predict(module, example, 0)["atom37_positions"], plain["atom37_positions"], atol=1e-4)
    done = run_tool("infer", ["--ckpt", checkpoint, "--fold", fasta, "--recycles", "1", "--out", tmp_path / "out"])
    assert done.returncode == 0, done.stderr[-3000:]
    written = read_chain(tmp_path / "out" / "ranked_0.pdb")
    mask = written.atom_mask > 0
    np.testing.assert_allclose(written.atom_positions[mask], plain["atom37_positions"][mask], atol=6e-4)


def test_fold_af2_features_npz_and_refuse_pickles(checkpoint, tmp_path):
    with open(SHARED / "casp14" / "T1026.features.pkl", "rb") as f:  # trusted shared data, converted for users
        raw = pickle.load(f)
    n, keep = len(raw["aatype"]), 30
    cropped = {}
    for key, value in raw.items():
        value = np.asarray(value)
        if key == "sequence":
            value = np.array([value.reshape(-1)[0][:keep]])
        elif n in value.shape:
            axis = value.shape.index(n)
            value = np.take(value, np.arange(keep), axis=axis)
        cropped[key] = value
    save_features_npz(cropped, tmp_path / "T1026_30.npz")
    done = run_tool("infer", ["--ckpt", checkpoint, "--fold", tmp_path / "T1026_30.npz", "--recycles", "0",
                              "--out", tmp_path / "out"])
    assert done.returncode == 0, done.stderr[-3000:]
    protein = read_chain(tmp_path / "out" / "ranked_0.pdb")
    assert len(protein) == keep and protein.sequence == raw["sequence"][0].decode()[:keep]
    refused = run_tool("infer", ["--ckpt", checkpoint, "--fold", SHARED / "casp14" / "T1026.features.pkl"])
    assert refused.returncode == 2 and "never unpickled" in refused.stderr
    missing = run_tool("infer", ["--ckpt", checkpoint, "--prompt", "x"])
    assert missing.returncode == 2 and "--fold FILE" in missing.stderr


def test_export_and_fold_with_the_exported_program(checkpoint, tmp_path):
    done = run_tool("export", ["--ckpt", checkpoint, "--out", tmp_path / "exported", "--recycles", "0"])
    assert done.returncode == 0, done.stderr[-3000:]
    fasta = tmp_path / "crambin.fasta"
    fasta.write_text(">crambin\nTTCCPSIVARSNFNVCRLPGTPEALCATYTGCIIIPGATCPGDYAN\n")  # not the export check's length
    done = run_tool("infer", ["--model", tmp_path / "exported", "--fold", fasta, "--out", tmp_path / "out"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert last_json_line(done.stdout)["settings"]["exported"] is True
    raw, _ = load_input(fasta)
    module, cfg = load_folding_checkpoint(checkpoint)
    eager = predict(module, make_example(raw, feature_config(cfg, FoldingOptions(), len(raw["aatype"])), 0), 0)
    written = read_chain(tmp_path / "out" / "ranked_0.pdb")
    mask = written.atom_mask > 0
    np.testing.assert_allclose(written.atom_positions[mask], eager["atom37_positions"][mask], atol=1e-3)
    np.testing.assert_allclose(written.b_factors[:, CA], eager["plddt"], atol=0.006)
    wrong = run_tool("infer", ["--model", tmp_path / "exported", "--fold", fasta, "--recycles", "2"])
    assert wrong.returncode == 2 and "exported with 0 recycles" in wrong.stderr


# ---------------------------------------------------------------------------------------------------------------
# AlphaFold2 / HelixFold parameter files
# ---------------------------------------------------------------------------------------------------------------
def af2_parameter_shapes(c):
    """{AF2 .npz name: shape} of an AlphaFold2 monomer model with the sizes of HelixFoldConfig `c`, written from
    AF2's Haiku modules (modules.py, folding.py): Linear weights [in, out], stacks with a leading block axis."""
    shapes = {}
    sm = c.structure_module

    def linear(scope, n_in, n_out, stack=()):
        shapes[f"{scope}//weights"], shapes[f"{scope}//bias"] = (*stack, n_in, n_out), (*stack, n_out)

    def norm(scope, n, stack=()):
        shapes[f"{scope}//scale"], shapes[f"{scope}//offset"] = (*stack, n), (*stack, n)

    def attention(scope, q, m, h, d, out, stack=(), gating=True):
        shapes.update({f"{scope}//query_w": (*stack, q, h, d), f"{scope}//key_w": (*stack, m, h, d),
                       f"{scope}//value_w": (*stack, m, h, d), f"{scope}//output_w": (*stack, h, d, out),
                       f"{scope}//output_b": (*stack, out)})
        if gating:
            shapes.update({f"{scope}//gating_w": (*stack, q, h, d), f"{scope}//gating_b": (*stack, h, d)})

    def transition(scope, n, factor, stack):
        norm(f"{scope}/input_layer_norm", n, stack)
        linear(f"{scope}/transition1", n, n * factor, stack)
        linear(f"{scope}/transition2", n * factor, n, stack)

    def pair_stack(scope, cz, heads, dim, mult, factor, stack):
        for side in ("starting", "ending"):
            s = f"{scope}/triangle_attention_{side}_node"
            norm(f"{s}/query_norm", cz, stack)
            shapes[f"{s}//feat_2d_weights"] = (*stack, cz, heads)
            attention(f"{s}/attention", cz, cz, heads, dim, cz, stack)
        for side in ("outgoing", "incoming"):
            s = f"{scope}/triangle_multiplication_{side}"
            norm(f"{s}/layer_norm_input", cz, stack)
            for part in ("left_projection", "right_projection", "left_gate", "right_gate"):
                linear(f"{s}/{part}", cz, mult, stack)
            norm(f"{s}/center_layer_norm", mult, stack)
            linear(f"{s}/output_projection", mult, cz, stack)
            linear(f"{s}/gating_linear", cz, cz, stack)
        transition(f"{scope}/pair_transition", cz, factor, stack)

    def msa_stack(scope, cm, row_h, row_d, col_h, col_d, stack, global_column):
        r = f"{scope}/msa_row_attention_with_pair_bias"
        norm(f"{r}/query_norm", cm, stack)
        norm(f"{r}/feat_2d_norm", c.pair_channel, stack)
        shapes[f"{r}//feat_2d_weights"] = (*stack, c.pair_channel, row_h)
        attention(f"{r}/attention", cm, cm, row_h, row_d, cm, stack)
        if global_column:
            g = f"{scope}/msa_column_global_attention"
            norm(f"{g}/query_norm", cm, stack)
            shapes.update({f"{g}/attention//query_w": (*stack, cm, col_h, col_d),
                           f"{g}/attention//key_w": (*stack, cm, col_d), f"{g}/attention//value_w": (*stack, cm, col_d),
                           f"{g}/attention//gating_w": (*stack, cm, col_h, col_d),
                           f"{g}/attention//gating_b": (*stack, col_h, col_d),
                           f"{g}/attention//output_w": (*stack, col_h, col_d, cm), f"{g}/attention//output_b": (*stack, cm)})
        else:
            norm(f"{scope}/msa_column_attention/query_norm", cm, stack)
            attention(f"{scope}/msa_column_attention/attention", cm, cm, col_h, col_d, cm, stack)
        transition(f"{scope}/msa_transition", cm, c.transition_factor, stack)
        o = f"{scope}/outer_product_mean"
        norm(f"{o}/layer_norm_input", cm, stack)
        linear(f"{o}/left_projection", cm, c.outer_product_channel, stack)
        linear(f"{o}/right_projection", cm, c.outer_product_channel, stack)
        shapes[f"{o}//output_w"] = (*stack, c.outer_product_channel, c.outer_product_channel, c.pair_channel)
        shapes[f"{o}//output_b"] = (*stack, c.pair_channel)
        pair_stack(scope, c.pair_channel, c.triangle_heads, c.triangle_head_dim, c.triangle_mult_channel,
                   c.transition_factor, stack)

    evo = "alphafold/alphafold_iteration/evoformer"
    linear(f"{evo}/preprocess_1d", 22, c.msa_channel)
    linear(f"{evo}/preprocess_msa", 49, c.msa_channel)
    linear(f"{evo}/left_single", 22, c.pair_channel)
    linear(f"{evo}/right_single", 22, c.pair_channel)
    linear(f"{evo}/pair_activiations", 65, c.pair_channel)
    linear(f"{evo}/prev_pos_linear", 15, c.pair_channel)
    norm(f"{evo}/prev_msa_first_row_norm", c.msa_channel)
    norm(f"{evo}/prev_pair_norm", c.pair_channel)
    tmpl = f"{evo}/template_embedding/single_template_embedding"
    linear(f"{tmpl}/embedding2d", 88, c.template_channel)
    pair_stack(f"{tmpl}/template_pair_stack/__layer_stack_no_state", c.template_channel, c.template_triangle_heads,
               c.template_triangle_head_dim, c.template_triangle_mult_channel, c.template_transition_factor,
               (c.template_pair_blocks,))
    norm(f"{tmpl}/output_layer_norm", c.template_channel)
    attention(f"{evo}/template_embedding/attention", c.pair_channel, c.template_channel, c.template_pointwise_heads,
              c.template_pointwise_head_dim, c.pair_channel, gating=False)
    linear(f"{evo}/template_single_embedding", 57, c.msa_channel)
    linear(f"{evo}/template_projection", c.msa_channel, c.msa_channel)
    linear(f"{evo}/extra_msa_activations", 25, c.extra_msa_channel)
    msa_stack(f"{evo}/extra_msa_stack", c.extra_msa_channel, c.extra_msa_row_heads, c.extra_msa_row_head_dim,
              c.extra_msa_column_heads, c.extra_msa_column_head_dim, (c.extra_msa_blocks,), True)
    msa_stack(f"{evo}/evoformer_iteration", c.msa_channel, c.msa_row_heads, c.msa_row_head_dim, c.msa_column_heads,
              c.msa_column_head_dim, (c.evoformer_blocks,), False)
    linear(f"{evo}/single_activations", c.msa_channel, c.single_channel)
    s = "alphafold/alphafold_iteration/structure_module"
    h, pq, pv = sm.num_heads_ipa, sm.num_qk_points, sm.num_v_points
    norm(f"{s}/single_layer_norm", sm.c_s)
    linear(f"{s}/initial_projection", sm.c_s, sm.c_s)
    norm(f"{s}/pair_layer_norm", sm.c_z)
    ipa = f"{s}/fold_iteration/invariant_point_attention"
    linear(f"{ipa}/q_scalar", sm.c_s, h * sm.c_ipa)
    linear(f"{ipa}/kv_scalar", sm.c_s, h * 2 * sm.c_ipa)
    linear(f"{ipa}/q_point_local", sm.c_s, h * 3 * pq)
    linear(f"{ipa}/kv_point_local", sm.c_s, h * 3 * (pq + pv))
    linear(f"{ipa}/attention_2d", sm.c_z, h)
    shapes[f"{ipa}//trainable_point_weights"] = (h,)
    linear(f"{ipa}/output_projection", h * (sm.c_z + sm.c_ipa + 4 * pv), sm.c_s)
    norm(f"{s}/fold_iteration/attention_layer_norm", sm.c_s)
    for name in ("transition", "transition_1", "transition_2"):
        linear(f"{s}/fold_iteration/{name}", sm.c_s, sm.c_s)
    norm(f"{s}/fold_iteration/transition_layer_norm", sm.c_s)
    linear(f"{s}/fold_iteration/affine_update", sm.c_s, 6)
    side = f"{s}/fold_iteration/rigid_sidechain"
    linear(f"{side}/input_projection", sm.c_s, sm.c_resnet)
    linear(f"{side}/input_projection_1", sm.c_s, sm.c_resnet)
    for name in ("resblock1", "resblock2", "resblock1_1", "resblock2_1"):
        linear(f"{side}/{name}", sm.c_resnet, sm.c_resnet)
    linear(f"{side}/unnormalized_angles", sm.c_resnet, 14)
    heads = "alphafold/alphafold_iteration"
    linear(f"{heads}/distogram_head/half_logits", c.pair_channel, 64)
    linear(f"{heads}/masked_msa_head/logits", c.msa_channel, 23)
    norm(f"{heads}/predicted_lddt_head/input_layer_norm", sm.c_s)
    linear(f"{heads}/predicted_lddt_head/act_0", sm.c_s, c.plddt_hidden)
    linear(f"{heads}/predicted_lddt_head/act_1", c.plddt_hidden, c.plddt_hidden)
    linear(f"{heads}/predicted_lddt_head/logits", c.plddt_hidden, 50)
    linear(f"{heads}/experimentally_resolved_head/logits", c.single_channel, 37)
    linear(f"{heads}/predicted_aligned_error_head/logits", c.pair_channel, 64)  # pTM models only
    return shapes


def helixfold_names(af2_arrays):
    """AF2 .npz arrays -> HelixFold .pdparams naming (per block, dotted), written here from its rules."""
    out = {}
    for key, value in af2_arrays.items():
        scope, param = key.split("//")
        param = {"weights": "weight", "scale": "weight", "offset": "bias"}.get(param, param)
        stacked = next((s for s in ("evoformer_iteration", "extra_msa_stack", "template_pair_stack")
                        if f"/{s}/" in scope + "/" and scope.split(f"/{s}")[0].endswith(("evoformer",
                                                                                          "single_template_embedding"))),
                       None)
        if stacked is None:
            out[f"{scope}/{param}".replace("/", ".")] = value
            continue
        head, tail = scope.split(f"/{stacked}", 1)
        tail = tail.replace("/__layer_stack_no_state", "")
        for i, block in enumerate(value):
            out[f"{head}/{stacked}/{i}{tail}/{param}".replace("/", ".")] = block
    return out


def distinct_sizes_config():
    """A small config whose widths all differ, so a weight put in the wrong place cannot fit by accident."""
    from ppzoo.models.helixfold.config import HelixFoldConfig
    from ppzoo.models.helixfold.structure_module import StructureModuleConfig

    return HelixFoldConfig(
        msa_channel=12, pair_channel=10, extra_msa_channel=6, single_channel=14, template_channel=4,
        evoformer_blocks=2, extra_msa_blocks=1, template_pair_blocks=2, msa_row_heads=2, msa_row_head_dim=3,
        msa_column_heads=3, msa_column_head_dim=5, extra_msa_row_heads=2, extra_msa_row_head_dim=7,
        extra_msa_column_heads=3, extra_msa_column_head_dim=2, triangle_heads=2, triangle_head_dim=9,
        template_triangle_heads=3, template_triangle_head_dim=4, template_pointwise_heads=2,
        template_pointwise_head_dim=11, outer_product_channel=5, triangle_mult_channel=13,
        template_triangle_mult_channel=15, num_recycle=1, plddt_hidden=17, msa_dropout=0.0, pair_dropout=0.0,
        structure_module=StructureModuleConfig(c_s=14, c_z=10, c_ipa=6, num_heads_ipa=3, num_qk_points=2,
                                               num_v_points=5, num_layers=2, c_resnet=19, dropout=0.0))


def test_af2_npz_and_helixfold_pdparams_load_by_name(tmp_path):
    from types import SimpleNamespace

    import paddle

    from ppzoo.data.protein.pipeline import FeatureConfig
    from ppzoo.errors import CheckpointError
    from ppzoo.models.helixfold.af2_weights import load_af2_parameters
    from ppzoo.models.helixfold.evoformer import OuterProductMean
    from ppzoo.models.helixfold.model import AlphaFold

    config = distinct_sizes_config()
    model = AlphaFold(config)
    model.eval()
    module = SimpleNamespace(model=model)
    cfg = SimpleNamespace(Model=config)
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(scale=0.2, size=s).astype("float32") for k, s in af2_parameter_shapes(config).items()}
    np.savez(tmp_path / "params_model_1_ptm.npz", **arrays)
    skipped = load_af2_parameters(module, tmp_path / "params_model_1_ptm.npz")
    assert skipped == ["alphafold.alphafold_iteration.predicted_aligned_error_head.logits.bias",
                       "alphafold.alphafold_iteration.predicted_aligned_error_head.logits.weight"]
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    evo = "alphafold/alphafold_iteration/evoformer/evoformer_iteration"
    np.testing.assert_array_equal(state["iteration.evoformer.blocks.1.row_attention.attention.query_w"],
                                  arrays[f"{evo}/msa_row_attention_with_pair_bias/attention//query_w"][1])
    np.testing.assert_array_equal(state["iteration.recycling_embedder.msa_norm.weight"],
                                  arrays["alphafold/alphafold_iteration/evoformer/prev_msa_first_row_norm//scale"])
    embed = arrays["alphafold/alphafold_iteration/evoformer/template_embedding/single_template_embedding/embedding2d//weights"]
    np.testing.assert_array_equal(state["iteration.template_embedder.embed_pair.weight"], embed[[*range(84), 87]])

    # Layout checks against AF2's formulas, computed from the AF2 arrays in NumPy:
    # invariant point attention's query points: AF2 splits the projection into x, y, z blocks of [H * P]
    sm = cfg.Model.structure_module
    ipa = model.iteration.structure_module.ipa
    single = rng.normal(size=(1, 5, sm.c_s)).astype("float32")
    scope = "alphafold/alphafold_iteration/structure_module/fold_iteration/invariant_point_attention/q_point_local"
    flat = single[0] @ arrays[f"{scope}//weights"] + arrays[f"{scope}//bias"]
    xyz = np.stack([p.reshape(5, sm.num_heads_ipa, sm.num_qk_points) for p in np.split(flat, 3, axis=-1)], -1)
    ours = ipa.q_points(paddle.to_tensor(single)).numpy().reshape(5, sm.num_heads_ipa, sm.num_qk_points, 3)
    np.testing.assert_allclose(ours, xyz, rtol=1e-5, atol=1e-5)
    # the outer product mean: act[i, j] = sum_s sum_{c,e} left[s, i, c] right[s, j, e] output_w[c, e, f] / S
    opm: OuterProductMean = model.iteration.evoformer.blocks[0].outer_product_mean
    msa = rng.normal(size=(1, 3, 4, cfg.Model.msa_channel)).astype("float32")
    mask = np.ones((1, 3, 4), "float32")
    x = opm.norm(paddle.to_tensor(msa)).numpy()[0]
    o = f"{evo}/outer_product_mean"
    left = x @ arrays[f"{o}/left_projection//weights"][0] + arrays[f"{o}/left_projection//bias"][0]
    right = x @ arrays[f"{o}/right_projection//weights"][0] + arrays[f"{o}/right_projection//bias"][0]
    expected = (np.einsum("sic,sje,cef->ijf", left, right, arrays[f"{o}//output_w"][0]) + arrays[f"{o}//output_b"][0])
    expected = expected / (3 + 1e-3)
    np.testing.assert_allclose(opm(paddle.to_tensor(msa), paddle.to_tensor(mask)).numpy()[0], expected,
                               rtol=1e-4, atol=1e-4)

    # HelixFold's per-block .pdparams naming loads to the same weights
    paddle.save({k: paddle.to_tensor(v) for k, v in helixfold_names(arrays).items()}, str(tmp_path / "helixfold.pdparams"))
    other = AlphaFold(config)
    load_af2_parameters(other, tmp_path / "helixfold.pdparams")
    for key, value in other.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)

    # with the loaded weights the model folds (finite coordinates and pLDDT)
    raw, _ = load_input(SHARED / "pdb" / "pdb1ubi.pdb")
    features = FeatureConfig(crop_size=76, max_msa_clusters=4, max_extra_msa=4, max_templates=1, training=False)
    prediction = predict(module, make_example(raw, features, 0), 1)
    assert np.isfinite(prediction["atom37_positions"]).all() and np.isfinite(prediction["plddt"]).all()

    # a file for another architecture says what does not fit
    del arrays[f"{evo}/msa_transition/transition1//bias"]
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(CheckpointError, match="lacks .*evoformer_iteration.0.msa_transition.transition1.bias"):
        load_af2_parameters(module, tmp_path / "broken.npz")
    arrays[f"{evo}/msa_transition/transition1//bias"] = np.zeros((9, 3), "float32")
    np.savez(tmp_path / "wide.npz", **arrays)
    with pytest.raises(CheckpointError, match="does not fit .*msa_transition.hidden.bias"):
        load_af2_parameters(module, tmp_path / "wide.npz")
