"""Protein structure metrics in NumPy: RMSD after Kabsch superposition, TM-score, GDT-TS, GDT-HA, lDDT-Ca,
and scoring a predicted PDB/mmCIF file against a native one (`score_files`, behind
`tools/eval.py --task structure`)."""
from ppzoo.eval.structure.compare import correspond, score_files, score_proteins
from ppzoo.eval.structure.scores import (GDT_HA_CUTOFFS, GDT_TS_CUTOFFS, gdt, lddt_ca, tm_d0, tm_score)
from ppzoo.eval.structure.superposition import apply_transform, kabsch, rmsd, superposed_rmsd

__all__ = ["kabsch", "apply_transform", "rmsd", "superposed_rmsd", "tm_score", "tm_d0", "gdt", "lddt_ca",
           "GDT_TS_CUTOFFS", "GDT_HA_CUTOFFS", "correspond", "score_proteins", "score_files"]
