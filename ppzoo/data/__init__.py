"""Tokenizers, the built-in corpus, packed datasets (registered on import) and the batch sampler."""
from ppzoo.data import datasets as _datasets  # noqa: F401  (registers BuiltinCorpus, TextFiles, LengthUpsampled)
from ppzoo.data import needle as _needle  # noqa: F401  (registers NeedleRetrieval)
from ppzoo.data.protein import dataset as _protein_dataset  # noqa: F401  (registers ProteinStructures)
from ppzoo.data import ernie_tasks as _ernie_tasks  # noqa: F401  (registers ErnieTitanTasks, TitanTopics)
from ppzoo.data import nebula_tasks as _nebula_tasks  # noqa: F401  (registers BuiltinLanguage, DocToSignature)
from ppzoo.data.tokenizer import Tokenizer, train_byte_level_bpe

__all__ = ["Tokenizer", "train_byte_level_bpe"]
