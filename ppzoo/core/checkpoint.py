"""Crash-safe checkpoints.

A checkpoint is a directory `step_00000020/` under the run's output directory. It is written under a
temporary name, every file fsynced, a `manifest.json` of SHA-256 checksums written last, and only then
renamed into place, so a checkpoint directory with a valid name is complete or it is detected as damaged:
loading verifies every checksum first. Old checkpoints beyond `keep_last` are removed only after the new
one is in place, so a crash at any moment leaves at least one good checkpoint.

Files (one set per tensor-parallel rank r; data-parallel replicas hold identical state and only the first
writes): `model.mp{r}.pdparams`, `optimizer.mp{r}.pdopt`, `rng.mp{r}.pdrng`, and `trainer_state.json`
(step, consumed samples, config, python/numpy random state).
"""
import hashlib
import json
import os
import re
import shutil

from ppzoo.errors import CheckpointError

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step):
    return f"step_{step:08d}"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def temporary_dir(root, step):
    return os.path.join(root, f".tmp-{step_dir_name(step)}")


def begin(root, step):
    """Create a fresh temporary directory for checkpoint `step` (removing leftovers of a crashed save)."""
    tmp = temporary_dir(root, step)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def commit(root, step, keep_last):
    """Checksum the temporary directory's files, write the manifest, fsync, rename into place, prune."""
    tmp = temporary_dir(root, step)
    files = sorted(name for name in os.listdir(tmp) if name != MANIFEST)
    for name in files:
        fsync_path(os.path.join(tmp, name))
    manifest = {"step": step, "files": {name: _sha256(os.path.join(tmp, name)) for name in files}}
    write_json(os.path.join(tmp, MANIFEST), manifest)
    fsync_path(tmp)
    final = os.path.join(root, step_dir_name(step))
    if os.path.exists(final):
        # Re-saving the same step (e.g. a resumed run that ends where it started): replace it.
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root):
    """Checkpoint directories under root, oldest first (by step number)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    return [os.path.join(root, name) for _, name in sorted(found)]


def verify(path):
    """Raise CheckpointError unless every file of the manifest is present with its checksum; returns the
    manifest."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path} has no {MANIFEST}: it is not a complete ppzoo checkpoint")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{manifest_path} is unreadable ({err})") from None
    for name, checksum in files.items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{file_path} is missing")
        if _sha256(file_path) != checksum:
            raise CheckpointError(f"{file_path} does not match its checksum in {MANIFEST} (truncated or corrupt)")
    return manifest


def last_good_checkpoint(root, exclude=None):
    for path in reversed(list_checkpoints(root)):
        if exclude and os.path.abspath(path) == os.path.abspath(exclude):
            continue
        try:
            verify(path)
        except CheckpointError:
            continue
        return path
    return None


def resolve_resume(resume, output_dir):
    """`auto` -> the newest checkpoint under output_dir (None if there is none); a path -> that path.
    The chosen checkpoint is verified; if it is damaged the error names the newest good one."""
    if resume == "auto":
        found = list_checkpoints(output_dir)
        if not found:
            return None
        path = found[-1]
    else:
        path = resume
        if not os.path.isdir(path):
            raise CheckpointError(f"--resume {path}: no such checkpoint directory")
    try:
        verify(path)
    except CheckpointError as err:
        root = os.path.dirname(os.path.abspath(path))
        good = last_good_checkpoint(root, exclude=path)
        hint = f" The last good checkpoint is {good}: resume from it with --resume {good}." if good else (
            " No good checkpoint was found beside it; start a new run without --resume."
        )
        raise CheckpointError(f"Cannot resume from {path}: {err}.{hint}") from None
    return path


def shard_file(path, kind, ext, mp_rank, ep_size, ep_rank):
    """The file of one expert-parallel shard: `model.mp0.pdparams` at ep 1, `model.mp0.ep1.pdparams` above."""
    name = f"{kind}.mp{mp_rank}" + (f".ep{ep_rank}" if ep_size > 1 else "") + f".{ext}"
    return os.path.join(path, name)


def merge_expert_shards(path, kind, ext, mp_rank, ep_size):
    """Elastic resume: the union of the `ep_size` shards of `kind` (model / optimizer) in checkpoint `path`.
    Experts are named by their global index, so the union is the whole model's state whatever the degree it
    was written at; replicated entries (dense weights, the LR schedule) are taken from shard 0."""
    import paddle  # the checkpoint format itself needs no Paddle; only reading shards does

    merged = {}
    for ep_rank in range(ep_size):
        file = shard_file(path, kind, ext, mp_rank, ep_size, ep_rank)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing: a checkpoint written at ep_degree={ep_size} needs all "
                                  f"{ep_size} of its {kind} shards to be re-partitioned.")
        for key, value in paddle.load(file).items():
            merged.setdefault(key, value)
    return merged


_OPTIMIZER_SUFFIX = re.compile(r"^(.*)_(moment1_0|moment2_0|beta1_pow_acc_0|beta2_pow_acc_0)$")


def keep_optimizer_state_of(state, parameter_names):
    """The optimizer entries of `parameter_names` (structured names), and the entries of no parameter."""
    kept = {}
    for key, value in state.items():
        match = _OPTIMIZER_SUFFIX.match(key)
        if match is None or match.group(1) in parameter_names:
            kept[key] = value
    return kept


def read_trainer_state(path):
    with open(os.path.join(path, TRAINER_STATE)) as f:
        return json.load(f)


def checkpoint_or_newest(path):
    """A checkpoint directory as given, or, for a run's output directory, its newest checkpoint."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST)) and list_checkpoints(path):
        return list_checkpoints(path)[-1]
    return path


def module_name(path):
    """The registered module a checkpoint (or a run directory's newest) was trained as, or None when `path`
    holds no ppzoo checkpoint. Tools use it to pick a model family's inference path."""
    path = checkpoint_or_newest(path)
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        return None
    return read_trainer_state(path)["config"].get("Model", {}).get("module")
