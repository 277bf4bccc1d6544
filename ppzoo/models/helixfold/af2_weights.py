"""AlphaFold2 parameter files (.npz, DeepMind's names) and HelixFold .pdparams loaded into ppzoo's HelixFold.

Both formats name AF2's Haiku modules. An AF2 .npz key is `scope//param`, e.g.
`alphafold/alphafold_iteration/evoformer/evoformer_iteration/msa_row_attention_with_pair_bias/attention//query_w`,
and the repeated blocks (Evoformer, extra MSA stack, template pair stack) are stacked along a leading axis.
HelixFold's .pdparams use the same names per block: `/` becomes `.`, the block index follows the stack's
name (`...evoformer_iteration.7.msa_row_attention_with_pair_bias.attention.query_w`), `__layer_stack_no_state`
is dropped, and `weights`/`scale` become `weight`, `offset` becomes `bias`. Both are read into that per-block
form (`unstack_af2`), then `name_map` pairs every name with a ppzoo parameter and, where the layouts differ, a
conversion:

- invariant point attention's point projections: AF2 orders their outputs (xyz, head, point), ppzoo
  (head, point, xyz);
- the global column attention's per-head tensors [C, H, D] are ppzoo Linear weights [C, H * D];
- the outer product mean's output_w [c, c, c_z] is a Linear weight [c * c, c_z];
- the template pair embedding: AF2's 88 input features include 3 unit-vector features that its released
  models zero (use_template_unit_vector=False) and ppzoo does not compute; their rows are dropped.

Every ppzoo parameter must be set and every name in the file used (the predicted aligned error head of the
pTM models is the one AF2 part ppzoo does not have; it is skipped and reported), and shapes must agree:
anything else is a CheckpointError naming the parameter. Use a config with AF2's sizes
(configs/helixfold/model_1.yaml ... model_5.yaml). The names are those of AF2 v2.0-v2.2's monomer models;
v2.3 fused the triangle multiplications' left/right projections into one tensor, which this map does not
split (the load stops naming the first missing `left_projection`).
"""
import os

import numpy as np

from ppzoo.errors import CheckpointError

ROOT = "alphafold.alphafold_iteration."
EVOFORMER = ROOT + "evoformer."
STACKS = {  # AF2 scope of a stacked block sequence -> its per-block (HelixFold) prefix
    "alphafold/alphafold_iteration/evoformer/evoformer_iteration/": EVOFORMER + "evoformer_iteration.",
    "alphafold/alphafold_iteration/evoformer/extra_msa_stack/": EVOFORMER + "extra_msa_stack.",
    "alphafold/alphafold_iteration/evoformer/template_embedding/single_template_embedding/template_pair_stack/":
        EVOFORMER + "template_embedding.single_template_embedding.template_pair_stack.",
}
SKIPPED = (ROOT + "predicted_aligned_error_head.",)  # pTM models' head: not part of ppzoo's HelixFold
ATTENTION = ("query_w", "key_w", "value_w", "gating_w", "gating_b", "output_w", "output_b")
TEMPLATE_UNIT_VECTOR_ROWS = slice(84, 87)  # dgram 39 + mask 1 + aatype 2 x 22 = 84, then 3 unit-vector rows


def _per_block_name(scope, param):
    return scope.replace("/", ".") + "." + {"weights": "weight", "scale": "weight", "offset": "bias"}.get(param, param)


def unstack_af2(arrays):
    """AF2 .npz arrays {scope//param: array} -> {per-block dotted name: array} (HelixFold's naming)."""
    out = {}
    for key, value in arrays.items():
        if "//" not in key:
            raise CheckpointError(f"{key!r} is not an AlphaFold2 parameter name (expected 'scope//param').")
        scope, param = key.split("//", 1)
        stack = next((s for s in STACKS if scope.startswith(s)), None)
        if stack is None:
            out[_per_block_name(scope, param)] = np.asarray(value)
            continue
        inner = scope[len(stack):]
        inner = inner[len("__layer_stack_no_state/"):] if inner.startswith("__layer_stack_no_state/") else inner
        for i, block in enumerate(np.asarray(value)):
            out[_per_block_name(f"{STACKS[stack]}{i}.{inner}", param)] = block
    return out


# ----------------------------------------------------------------------------------------------------------
# The name map: (per-block AF2 name, ppzoo parameter name, conversion)


def _same(value, shape):
    return value


def _flatten_last_two(value, shape):
    return value.reshape(shape)


def _points_xyz_last(value, shape):
    """AF2's point projection, outputs ordered (xyz, head, point) -> ppzoo's (head, point, xyz). Works for the
    weight [C, 3*H*P] and the bias [3*H*P]; `shape` is ppzoo's."""
    lead = value.shape[:-1]
    return np.moveaxis(value.reshape(*lead, 3, -1), -2, -1).reshape(shape)


def _drop_template_unit_vectors(value, shape):
    return np.delete(value, np.arange(88)[TEMPLATE_UNIT_VECTOR_ROWS], axis=0)


def _linear(entries, af2, ours, convert=_same, convert_bias=_same):
    entries.append((af2 + ".weight", ours + ".weight", convert))
    entries.append((af2 + ".bias", ours + ".bias", convert_bias))


def _layer_norm(entries, af2, ours):
    _linear(entries, af2, ours)


def _attention(entries, af2, ours, gating=True):
    for name in ATTENTION:
        if gating or not name.startswith("gating"):
            entries.append((f"{af2}.attention.{name}", f"{ours}.{name}", _same))


def _transition(entries, af2, ours):
    _layer_norm(entries, af2 + ".input_layer_norm", ours + ".norm")
    _linear(entries, af2 + ".transition1", ours + ".hidden")
    _linear(entries, af2 + ".transition2", ours + ".output")


def _pair_updates(entries, af2, ours, transition="pair_transition"):
    for side, name in (("starting", "tri_att_start"), ("ending", "tri_att_end")):
        base = f"{af2}.triangle_attention_{side}_node"
        _layer_norm(entries, base + ".query_norm", f"{ours}.{name}.norm")
        entries.append((base + ".feat_2d_weights", f"{ours}.{name}.bias.weight", _same))
        _attention(entries, base, f"{ours}.{name}.attention")
    for side, name in (("outgoing", "tri_mul_out"), ("incoming", "tri_mul_in")):
        base, mine = f"{af2}.triangle_multiplication_{side}", f"{ours}.{name}"
        _layer_norm(entries, base + ".layer_norm_input", mine + ".norm")
        for part in ("left_projection", "right_projection"):
            _linear(entries, f"{base}.{part}", f"{mine}.{part.replace('projection', 'proj')}")
        for part in ("left_gate", "right_gate"):
            _linear(entries, f"{base}.{part}", f"{mine}.{part}")
        _layer_norm(entries, base + ".center_layer_norm", mine + ".output_norm")
        _linear(entries, base + ".output_projection", mine + ".output")
        _linear(entries, base + ".gating_linear", mine + ".output_gate")
    _transition(entries, f"{af2}.pair_transition", f"{ours}.{transition}")


def _msa_updates(entries, af2, ours, global_column):
    row = af2 + ".msa_row_attention_with_pair_bias"
    _layer_norm(entries, row + ".query_norm", ours + ".row_attention.msa_norm")
    _layer_norm(entries, row + ".feat_2d_norm", ours + ".row_attention.pair_norm")
    entries.append((row + ".feat_2d_weights", ours + ".row_attention.pair_bias.weight", _same))
    _attention(entries, row, ours + ".row_attention.attention")
    if global_column:
        column = af2 + ".msa_column_global_attention"
        _layer_norm(entries, column + ".query_norm", ours + ".column_attention.norm")
        mine = ours + ".column_attention.attention"
        for theirs, name, convert in (("query_w", "query.weight", _flatten_last_two),
                                      ("key_w", "key.weight", _same), ("value_w", "value.weight", _same),
                                      ("gating_w", "gate.weight", _flatten_last_two),
                                      ("gating_b", "gate.bias", _flatten_last_two),
                                      ("output_w", "output.weight", _flatten_last_two),
                                      ("output_b", "output.bias", _same)):
            entries.append((f"{column}.attention.{theirs}", f"{mine}.{name}", convert))
    else:
        column = af2 + ".msa_column_attention"
        _layer_norm(entries, column + ".query_norm", ours + ".column_attention.norm")
        _attention(entries, column, ours + ".column_attention.attention")
    _transition(entries, af2 + ".msa_transition", ours + ".msa_transition")
    opm, mine = af2 + ".outer_product_mean", ours + ".outer_product_mean"
    _layer_norm(entries, opm + ".layer_norm_input", mine + ".norm")
    _linear(entries, opm + ".left_projection", mine + ".left")
    _linear(entries, opm + ".right_projection", mine + ".right")
    entries.append((opm + ".output_w", mine + ".output.weight", _flatten_last_two))
    entries.append((opm + ".output_b", mine + ".output.bias", _same))
    _pair_updates(entries, af2, ours)


def name_map(cfg, prefix="iteration"):
    """[(per-block AF2 name, ppzoo parameter name under AlphaFold, conversion(value, ppzoo shape))] for a
    HelixFoldConfig."""
    e = []
    p = prefix + "."
    _linear(e, EVOFORMER + "preprocess_1d", p + "input_embedder.target_to_msa")
    _linear(e, EVOFORMER + "preprocess_msa", p + "input_embedder.msa_to_msa")
    _linear(e, EVOFORMER + "left_single", p + "input_embedder.left_single")
    _linear(e, EVOFORMER + "right_single", p + "input_embedder.right_single")
    _linear(e, EVOFORMER + "pair_activiations", p + "input_embedder.relative_position")  # AF2's spelling
    _linear(e, EVOFORMER + "prev_pos_linear", p + "recycling_embedder.distances")
    _layer_norm(e, EVOFORMER + "prev_msa_first_row_norm", p + "recycling_embedder.msa_norm")
    _layer_norm(e, EVOFORMER + "prev_pair_norm", p + "recycling_embedder.pair_norm")
    if cfg.templates:
        single = EVOFORMER + "template_embedding.single_template_embedding."
        _linear(e, single + "embedding2d", p + "template_embedder.embed_pair", _drop_template_unit_vectors)
        for i in range(cfg.template_pair_blocks):
            _pair_updates(e, f"{single}template_pair_stack.{i}", f"{p}template_embedder.pair_stack.{i}", "transition")
        _layer_norm(e, single + "output_layer_norm", p + "template_embedder.pair_norm")
        _attention(e, EVOFORMER + "template_embedding", p + "template_embedder.pointwise", gating=False)
        if cfg.template_torsion_angles:
            _linear(e, EVOFORMER + "template_single_embedding", p + "template_embedder.angle_hidden")
            _linear(e, EVOFORMER + "template_projection", p + "template_embedder.angle_output")
    if cfg.extra_msa_blocks:
        _linear(e, EVOFORMER + "extra_msa_activations", p + "extra_msa_stack.embed")
        for i in range(cfg.extra_msa_blocks):
            _msa_updates(e, f"{EVOFORMER}extra_msa_stack.{i}", f"{p}extra_msa_stack.blocks.{i}", global_column=True)
    for i in range(cfg.evoformer_blocks):
        _msa_updates(e, f"{EVOFORMER}evoformer_iteration.{i}", f"{p}evoformer.blocks.{i}", global_column=False)
    _linear(e, EVOFORMER + "single_activations", p + "evoformer.single")

    sm, mine = ROOT + "structure_module.", p + "structure_module."
    _layer_norm(e, sm + "single_layer_norm", mine + "single_norm")
    _linear(e, sm + "initial_projection", mine + "initial_projection")
    _layer_norm(e, sm + "pair_layer_norm", mine + "pair_norm")
    ipa = sm + "fold_iteration.invariant_point_attention."
    _linear(e, ipa + "q_scalar", mine + "ipa.q")
    _linear(e, ipa + "kv_scalar", mine + "ipa.kv")
    # the biases are laid out like the weights' outputs
    _linear(e, ipa + "q_point_local", mine + "ipa.q_points", _points_xyz_last, _points_xyz_last)
    _linear(e, ipa + "kv_point_local", mine + "ipa.kv_points", _points_xyz_last, _points_xyz_last)
    _linear(e, ipa + "attention_2d", mine + "ipa.pair_bias")
    e.append((ipa + "trainable_point_weights", mine + "ipa.head_weights", _same))
    _linear(e, ipa + "output_projection", mine + "ipa.output")
    fold = sm + "fold_iteration."
    _layer_norm(e, fold + "attention_layer_norm", mine + "ipa_norm")
    layers = cfg.structure_module.num_transition_layers
    for i in range(layers):
        _linear(e, fold + ("transition" if i == 0 else f"transition_{i}"), f"{mine}transition.{i}")
    _layer_norm(e, fold + "transition_layer_norm", mine + "transition_norm")
    _linear(e, fold + "affine_update", mine + "backbone_update.linear")
    side = fold + "rigid_sidechain."
    _linear(e, side + "input_projection", mine + "angle_resnet.input")
    _linear(e, side + "input_projection_1", mine + "angle_resnet.input_initial")
    for i in range(cfg.structure_module.num_resnet_blocks):
        suffix = "" if i == 0 else f"_{i}"
        _linear(e, f"{side}resblock1{suffix}", f"{mine}angle_resnet.blocks.{i}.0")
        _linear(e, f"{side}resblock2{suffix}", f"{mine}angle_resnet.blocks.{i}.1")
    _linear(e, side + "unnormalized_angles", mine + "angle_resnet.output")

    _linear(e, ROOT + "distogram_head.half_logits", p + "distogram_head.logits")
    _linear(e, ROOT + "masked_msa_head.logits", p + "masked_msa_head.logits")
    _layer_norm(e, ROOT + "predicted_lddt_head.input_layer_norm", p + "plddt_head.norm")
    _linear(e, ROOT + "predicted_lddt_head.act_0", p + "plddt_head.hidden1")
    _linear(e, ROOT + "predicted_lddt_head.act_1", p + "plddt_head.hidden2")
    _linear(e, ROOT + "predicted_lddt_head.logits", p + "plddt_head.logits")
    _linear(e, ROOT + "experimentally_resolved_head.logits", p + "experimentally_resolved_head.logits")
    return e


# ----------------------------------------------------------------------------------------------------------
# Reading files and loading


def read_parameter_file(path):
    """{per-block dotted name: array} from an AF2 .npz or a HelixFold .pdparams file."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such parameter file (expected an AlphaFold2 .npz or HelixFold .pdparams).")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                return unstack_af2({key: data[key] for key in data.files})
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable AlphaFold2 .npz parameter file: {exc}") from exc
    if path.endswith(".pdparams"):
        import paddle

        state = paddle.load(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of HelixFold parameters.")
        return {key: np.asarray(value.numpy() if hasattr(value, "numpy") else value) for key, value in state.items()}
    raise CheckpointError(f"{path}: parameter files must be AlphaFold2 .npz or HelixFold .pdparams.")


def convert(arrays, model):
    """{ppzoo parameter name: array} for `model` (an AlphaFold layer) from per-block AF2 arrays, and the
    names skipped. CheckpointError for a missing, unused or mis-shaped parameter."""
    params = dict(model.named_parameters())
    state, used = {}, set()
    for theirs, ours, conversion in name_map(model.cfg):
        if ours not in params:
            raise CheckpointError(f"ppzoo's HelixFold has no parameter {ours} (mapped from {theirs}); the model's "
                                  "layout changed: update ppzoo/models/helixfold/af2_weights.py.")
        if theirs not in arrays:
            raise CheckpointError(f"the parameter file lacks {theirs} (for {ours}); is it an AlphaFold2 monomer "
                                  "model with the same number of blocks as the config?")
        shape = list(params[ours].shape)
        value = np.asarray(conversion(np.asarray(arrays[theirs], dtype=np.float32), shape))
        if list(value.shape) != shape:
            raise CheckpointError(f"{theirs} has shape {list(arrays[theirs].shape)}, which does not fit {ours} "
                                  f"{shape}: use a config with AF2's sizes (configs/helixfold/model_1.yaml ...).")
        state[ours] = value
        used.add(theirs)
    missing = sorted(set(params) - set(state))
    if missing:
        raise CheckpointError(f"no AlphaFold2 name maps to {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}; update af2_weights.name_map.")
    skipped = sorted(k for k in arrays if k not in used and k.startswith(SKIPPED))
    unused = sorted(k for k in arrays if k not in used and not k.startswith(SKIPPED))
    if unused:
        raise CheckpointError(f"the parameter file has {len(unused)} parameters this model does not use, e.g. "
                              f"{', '.join(unused[:3])}: is the config's number of blocks (evoformer_blocks, "
                              f"extra_msa_blocks, template_pair_blocks) or templates setting different?")
    return state, skipped


def load_af2_parameters(model, path):
    """Load an AlphaFold2 .npz or HelixFold .pdparams into `model` (AlphaFold, or a module with .model);
    returns the names skipped (the pTM head, if present)."""
    model = getattr(model, "model", model)
    state, skipped = convert(read_parameter_file(path), model)
    model.set_state_dict(state)
    return skipped
