"""Loading Hugging Face tokenizers, and training a codegen-style byte-level BPE offline.

Real runs use the codegen-350M-mono tokenizer (``microsoft/phi-1``: GPT-2 byte-level BPE plus whitespace-run
tokens, ``<|endoftext|>`` = 50256). Machines without hub access train a tokenizer of the same kind on the
embedded corpus (the running interpreter's standard library) with the ``tokenizers`` library.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from phi1_ray import storage
from phi1_ray.config import Section
from phi1_ray.data.config import SourceConfig
from phi1_ray.errors import CheckpointError, ConfigError


class TokenizerConfig(Section):
    """Where the tokenizer comes from: a local directory or hub id, or trained offline on ``sources``."""

    path: str | None = None
    """Directory or Hugging Face hub id (for example ``microsoft/phi-1``); None trains one offline."""
    vocab_size: int = 4096
    """Size of a tokenizer trained offline (BPE merges + 256 bytes + special and whitespace tokens)."""
    sources: list[SourceConfig] = [SourceConfig(type="stdlib", max_bytes=8_000_000)]
    """Corpus a tokenizer is trained on."""


class TrainTokenizerConfig(Section):
    """``jobs/train_tokenizer.py``: a codegen-style byte-level BPE trained offline."""

    run_dir: str = "runs/tokenizer"
    out: str | None = None
    """Tokenizer directory (default ``run_dir/tokenizer``)."""
    tokenizer: TokenizerConfig = TokenizerConfig()


EOS = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path_or_id: str | Path) -> Any:
    """A ``transformers`` tokenizer from a local directory, a directory on object storage (``s3://``, ``gs://``:
    copied once to the local cache) or a hub id (online)."""
    from transformers import AutoTokenizer

    path_or_id = storage.localize(path_or_id)
    path = Path(path_or_id).expanduser()
    if path.exists() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{path} holds no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(path_or_id))
    except Exception as exc:  # unknown hub id, offline machine, unreadable files
        raise CheckpointError(f"cannot load a tokenizer from {str(path_or_id)!r}: {str(exc).splitlines()[0]}") from None


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


def check_vocab(tokenizer: Any, vocab_size: int) -> None:
    """The model's embedding must have a row for every token id the tokenizer can emit."""
    n = len(tokenizer)
    if n > vocab_size:
        raise ConfigError(
            f"tokenizer has {n} tokens but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size >= {n} (phi-1 pads 50,295 codegen tokens to 51,200)"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Any:
    """Train a codegen-style byte-level BPE and save it where ``AutoTokenizer.from_pretrained`` finds it.

    GPT-2 pre-tokenization and byte alphabet, ``<|endoftext|>`` as EOS/BOS, and codegen's whitespace-run tokens
    (2-31 spaces, 2-9 tabs) so indentation costs one token.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    whitespace = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
    n_base = vocab_size - len(whitespace)
    if n_base < 256 + 1:
        raise ConfigError(f"tokenizer.vocab_size must be >= {256 + 1 + len(whitespace)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_base,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(w, normalized=False) for w in whitespace])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return load_tokenizer(out)


def train_from_sources(sources: list[Any], vocab_size: int, out_dir: str | Path) -> Any:
    """Train on the documents of corpus ``sources`` (see :class:`phi1_ray.data.config.SourceConfig`), in order."""
    from phi1_ray.data.read import iter_texts

    return train_tokenizer(iter_texts(sources), vocab_size, out_dir)
