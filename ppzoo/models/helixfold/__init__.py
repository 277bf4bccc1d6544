"""HelixFold: AlphaFold2 in Paddle, with HelixFold's training optimizations.

config.py          HelixFoldConfig (the Model section; AF2's sizes by default)
primitives.py      gated attention (plain and fused kernel), global attention, transitions, chunking
embedders.py       input embedder with relative positions, recycling embedder
template.py        template pair stack, pointwise attention, template angle features
evoformer.py       Evoformer blocks and the extra MSA stack
structure_module.py, geometry.py   invariant point attention, backbone updates, all-atom coordinates
heads.py           distogram, masked MSA, pLDDT, experimentally resolved
losses.py, lddt.py AF2's losses and lDDT
model.py           one iteration and recycling
module.py          the engine Module "HelixFold"
"""
