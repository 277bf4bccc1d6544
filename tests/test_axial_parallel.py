"""Dynamic axial parallelism (ppzoo.distributed.axial_parallel): the Evoformer and the extra MSA stack with
their MSA and pair activations split over two processes (gloo, all_gather standing in for all-to-all) give
the outputs and gradients of the one-process model, on random weights and inputs with padding.
"""
import json

import numpy as np
import paddle
import pytest

from conftest import REPO_ROOT, run_launch
from ppzoo.distributed.axial_parallel import AxialParallel
from ppzoo.errors import ConfigError
from ppzoo.models.helixfold.config import HelixFoldConfig
from ppzoo.models.helixfold.evoformer import EvoformerStack, ExtraMSAStack
from ppzoo.models.helixfold.structure_module import StructureModuleConfig

CHECK = REPO_ROOT / "tests" / "dist_scripts" / "axial_parallel_check.py"
B, S, E, N = 1, 4, 6, 8  # S, E and N divisible by the DAP degree 2


def stack_config():
    return dict(msa_channel=8, pair_channel=8, extra_msa_channel=8, single_channel=8, evoformer_blocks=2,
                extra_msa_blocks=1, msa_row_heads=2, msa_row_head_dim=4, msa_column_heads=2, msa_column_head_dim=4,
                extra_msa_row_heads=2, extra_msa_row_head_dim=4, extra_msa_column_heads=2,
                extra_msa_column_head_dim=4, triangle_heads=2, triangle_head_dim=4, outer_product_channel=4,
                triangle_mult_channel=8, msa_dropout=0.0, pair_dropout=0.0)


def build_stacks(config, problem):
    cfg = HelixFoldConfig(**config, structure_module=StructureModuleConfig(c_s=8, c_z=8))
    evoformer, extra = EvoformerStack(cfg), ExtraMSAStack(cfg)
    for prefix, stack in (("evoformer/", evoformer), ("extra/", extra)):
        stack.set_state_dict({k: problem[prefix + k] for k in stack.state_dict()})
        stack.eval()
    return evoformer, extra


def run_stacks(evoformer, extra, problem, dap):
    """Outputs and gradients of a scalar loss (fixed random weights over every output)."""
    evoformer.axial = extra.axial = dap
    t = {k: paddle.to_tensor(problem[k]) for k in ("msa", "pair", "extra_feat", "msa_mask", "extra_mask", "pair_mask")}
    for key in ("msa", "pair", "extra_feat"):
        t[key].stop_gradient = False
    pair = extra(t["extra_feat"], t["extra_mask"], t["pair"], t["pair_mask"])
    msa, pair, single = evoformer(t["msa"], pair, t["msa_mask"], t["pair_mask"])
    loss = sum((out * paddle.to_tensor(problem[f"w_{name}"])).sum()
               for name, out in (("msa", msa), ("pair", pair), ("single", single)))
    loss.backward()
    # the blocks work on shards: their gradients are summed over the group; EvoformerStack.single runs
    # replicated after the stack and has its whole gradient already
    dap.sync_gradients([*evoformer.blocks.parameters(), *extra.blocks.parameters(), *extra.embed.parameters()])
    results = {"out/msa": msa.numpy(), "out/pair": pair.numpy(), "out/single": single.numpy()}
    for key in ("msa", "pair", "extra_feat"):
        results[f"grad_input/{key}"] = t[key].grad.numpy()
    for prefix, stack in (("evoformer/", evoformer), ("extra/", extra)):
        for name, param in stack.named_parameters():
            results[f"grad/{prefix}{name}"] = param.grad.numpy()
    return results


def make_problem():
    rng = np.random.default_rng(0)
    config = stack_config()
    cfg = HelixFoldConfig(**config, structure_module=StructureModuleConfig(c_s=8, c_z=8))
    paddle.seed(0)
    problem = {}
    for prefix, stack in (("evoformer/", EvoformerStack(cfg)), ("extra/", ExtraMSAStack(cfg))):
        for name, value in stack.state_dict().items():  # random: AF2's zero-initialized outputs hide errors
            problem[prefix + name] = rng.normal(scale=0.3, size=value.shape).astype("float32")
    seq_mask = np.ones(N, "float32")
    seq_mask[-1] = 0.0  # a padded residue
    msa_mask = (rng.random((B, S, N)) > 0.2).astype("float32") * seq_mask
    msa_mask[:, 0] = seq_mask
    problem.update(
        msa=rng.normal(size=(B, S, N, 8)).astype("float32"), pair=rng.normal(size=(B, N, N, 8)).astype("float32"),
        extra_feat=rng.normal(size=(B, E, N, 25)).astype("float32"), msa_mask=msa_mask,
        extra_mask=(rng.random((B, E, N)) > 0.2).astype("float32") * seq_mask,
        pair_mask=np.broadcast_to(seq_mask[:, None] * seq_mask[None], (B, N, N)).copy(),
        w_msa=rng.normal(size=(B, S, N, 8)).astype("float32"), w_pair=rng.normal(size=(B, N, N, 8)).astype("float32"),
        w_single=rng.normal(size=(B, N, 8)).astype("float32"),
    )
    return config, problem


def test_degree_one_is_the_plain_path_and_sizes_must_divide():
    dap = AxialParallel()
    x = paddle.ones([2, 3])
    assert dap.split(x, 1) is x and dap.gather(x, 1) is x and dap.transpose(x, 0, 1) is x
    two = AxialParallel()
    two.degree = 2
    with pytest.raises(ConfigError, match=r"\(3\) must be divisible by Distributed.dap_degree \(2\)"):
        two.check_divisible("the residues", 3)


def test_dap2_equals_dap1_in_outputs_and_gradients(tmp_path):
    config, problem = make_problem()
    np.savez(tmp_path / "problem.npz", **problem)
    (tmp_path / "problem.json").write_text(json.dumps(config))
    reference = run_stacks(*build_stacks(config, problem), problem, AxialParallel())
    run_launch([CHECK, tmp_path / "problem", tmp_path / "out"], nproc=2, log_dir=tmp_path / "log")
    for rank in range(2):
        got = dict(np.load(tmp_path / f"out.rank{rank}.npz"))
        assert set(got) == set(reference)
        for key, want in reference.items():
            np.testing.assert_allclose(got[key], want, rtol=2e-4, atol=2e-5, err_msg=f"rank {rank}: {key}")
        assert any(np.abs(v).max() > 1e-3 for k, v in got.items() if k.startswith("grad/evoformer/blocks.1"))


@pytest.mark.skipif(not (REPO_ROOT.parent / "shared" / "data" / "proteins").is_dir(),
                    reason="../shared/data/proteins is absent (shared test data)")
def test_folding_with_dap2_writes_the_single_process_structure(tmp_path):
    """tools/infer.py --dap-degree 2 under paddle.distributed.launch: 35 residues (padded to 36 to split) fold
    to the structure and pLDDT of the single-process run."""
    from conftest import last_json_line, run_tool
    from ppzoo.data.protein.structure import read_chain

    overrides = ["Engine.max_steps=1", "Engine.save_steps=1", "Engine.eval_freq=0", "Engine.progress_bar=false",
                 f"Engine.output_dir={tmp_path / 'run'}", "Global.global_batch_size=1", "Global.micro_batch_size=1",
                 "Data.Train.crop_size=16"]
    done = run_tool("train", ["-c", REPO_ROOT / "configs" / "helixfold" / "tiny.yaml",
                              *[a for o in overrides for a in ("-o", o)]])
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = last_json_line(done.stdout)["checkpoint"]
    fasta = tmp_path / "ubq35.fasta"
    fasta.write_text(">ubq35\nMQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEG\n")
    common = ["--ckpt", checkpoint, "--fold", fasta, "--recycles", "1"]
    single = run_tool("infer", [*common, "--out", tmp_path / "single"])
    assert single.returncode == 0, single.stderr[-3000:]
    run_launch([REPO_ROOT / "tools" / "infer.py", *common, "--dap-degree", "2", "--out", tmp_path / "dap"], nproc=2,
               log_dir=tmp_path / "log")
    a, b = read_chain(tmp_path / "single" / "ranked_0.pdb"), read_chain(tmp_path / "dap" / "ranked_0.pdb")
    assert len(a) == len(b) == 35 and a.sequence == b.sequence
    np.testing.assert_allclose(b.atom_positions, a.atom_positions, atol=2e-3)
    np.testing.assert_allclose(b.b_factors, a.b_factors, atol=0.011)
