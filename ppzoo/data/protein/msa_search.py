"""MSAs for a query sequence: reading Stockholm and A3M alignments, and searching a local sequence database
with jackhmmer (HMMER) when it is installed.

AlphaFold2 keeps only the alignment columns where the query has a residue; the residues a hit has in the
other columns (insertions relative to the query) are counted into the deletion matrix at the next query
column, which is what `deletion_value` / `has_deletion` in the model features describe.
"""
import os
import shutil
import subprocess
import tempfile

from ppzoo.data.protein.raw_features import check_sequence, msa_features, read_fasta, sequence_features
from ppzoo.data.protein.raw_features import empty_template_features
from ppzoo.errors import DataError

JACKHMMER_INSTALL_HINT = "Install HMMER (Debian/Ubuntu: `apt-get install hmmer`) so that `jackhmmer` is on PATH."


def _query_columns(aligned_query):
    return [i for i, c in enumerate(aligned_query) if c not in "-."]


def _project_to_query(aligned_row, keep):
    """(row over query columns, deletion counts) of one aligned row, given the query's residue columns."""
    keep_set = set(keep)
    row, deletions, pending = [], [], 0
    for i, c in enumerate(aligned_row):
        if i in keep_set:
            row.append("-" if c in "-." else c.upper())
            deletions.append(pending)
            pending = 0
        elif c not in "-.":
            pending += 1
    return "".join(row), deletions


def parse_stockholm(text):
    """(aligned rows over query columns, deletion matrix, names) of a Stockholm alignment whose first sequence
    is the query (as jackhmmer writes it)."""
    order, rows = [], {}
    for line in text.splitlines():
        line = line.rstrip()
        if not line or line.startswith("#") or line.startswith("//"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"Stockholm line {line[:60]!r} is not 'name aligned-sequence'.")
        name, chunk = parts
        if name not in rows:
            order.append(name)
            rows[name] = []
        rows[name].append(chunk)
    if not order:
        raise DataError("The Stockholm alignment has no sequences.")
    aligned = ["".join(rows[name]) for name in order]
    keep = _query_columns(aligned[0])
    sequences, deletions = [], []
    for row in aligned:
        projected, dels = _project_to_query(row, keep)
        sequences.append(projected)
        deletions.append(dels)
    return sequences, deletions, order


def parse_a3m(text):
    """(aligned rows, deletion matrix, names) of an A3M alignment: lowercase letters are insertions."""
    sequences, deletions, names = [], [], []
    for description, row in read_fasta(text, from_text=True):
        projected, dels, pending = [], [], 0
        for c in row:
            if c.islower() or c == ".":
                pending += c != "."
            else:
                projected.append(c)
                dels.append(pending)
                pending = 0
        sequences.append("".join(projected))
        deletions.append(dels)
        names.append(description.split()[0] if description else "")
    widths = {len(s) for s in sequences}
    if len(widths) != 1:
        raise DataError(f"The A3M rows have different numbers of match columns ({sorted(widths)}); it is not aligned.")
    return sequences, deletions, names


def find_jackhmmer():
    """Path of the jackhmmer binary, or None when HMMER is not installed."""
    return shutil.which("jackhmmer")


def run_jackhmmer(query_sequence, database_fasta, n_iter=1, e_value=1e-4, cpus=1, max_sequences=10000):
    """Search `database_fasta` for homologs of the query with jackhmmer; returns (rows, deletions, names) with
    the query first. Needs HMMER: DataError with the install command otherwise."""
    binary = find_jackhmmer()
    if binary is None:
        raise DataError(f"MSA search needs jackhmmer, which is not installed. {JACKHMMER_INSTALL_HINT}")
    if not os.path.isfile(database_fasta):
        raise DataError(f"Sequence database {database_fasta} does not exist (resolved from {os.getcwd()}).")
    query_sequence = check_sequence(query_sequence, where="query sequence")
    with tempfile.TemporaryDirectory(prefix="jackhmmer_") as tmp:
        query_path = os.path.join(tmp, "query.fasta")
        sto_path = os.path.join(tmp, "hits.sto")
        with open(query_path, "w", encoding="utf-8") as f:
            f.write(f">query\n{query_sequence}\n")
        command = [binary, "-o", os.devnull, "-A", sto_path, "--noali", "-N", str(int(n_iter)),
                   "-E", str(e_value), "--incE", str(e_value), "--cpu", str(int(cpus)), query_path, database_fasta]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise DataError(f"jackhmmer failed (exit {result.returncode}) on {database_fasta}: "
                            f"{result.stderr.strip()[-500:]}")
        if not os.path.exists(sto_path):  # no hit at all: jackhmmer writes no alignment
            return [query_sequence], [[0] * len(query_sequence)], ["query"]
        with open(sto_path, encoding="utf-8") as f:
            rows, deletions, names = parse_stockholm(f.read())
    if rows[0].replace("-", "") != query_sequence or len(rows[0]) != len(query_sequence):
        raise DataError("jackhmmer's alignment does not start with the query sequence; cannot align the hits to it.")
    return rows[:max_sequences], deletions[:max_sequences], names[:max_sequences]


def msa_raw_features(fasta_path, database_fasta, **search_args):
    """Raw features of a FASTA's first sequence with an MSA from a local sequence database (no templates)."""
    description, sequence = read_fasta(fasta_path)[0]
    sequence = check_sequence(sequence, where=f"{fasta_path} ({description})")
    rows, deletions, _ = run_jackhmmer(sequence, database_fasta, **search_args)
    features = sequence_features(sequence)
    features.update(msa_features(rows, deletions))
    features.update(empty_template_features(len(sequence)))
    return features
