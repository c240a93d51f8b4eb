"""A byte-level BPE tokenizer trained offline on the dataset text, with GLM's special tokens.

Saved as a standard Hugging Face folder (``tokenizer.json`` + configs) so
``transformers.AutoTokenizer.from_pretrained(folder)`` loads it; any local Hugging Face tokenizer
folder can be used instead. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# GLM's markers: [gMASK] opens every sequence and <sop> starts the generated part (GLM-130B,
# ChatGLM); [MASK]/[sMASK] blank out spans; media placeholders are replaced by tower tokens.
SPECIAL_TOKENS = {
    "pad_token": "<|pad|>",
    "unk_token": "<|unk|>",
    "mask_token": "[MASK]",
    "eos_token": "<|endoftext|>",
}
GLM_TOKENS = [
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|image|>",
    "<|end_of_image|>",
    "<|begin_of_audio|>",
    "<|audio|>",
    "<|end_of_audio|>",
]
TOKENIZER_VERSION = 1


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and save it to ``out_dir`` (atomically)."""
    specials = list(SPECIAL_TOKENS.values()) + GLM_TOKENS
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Every encoded sequence starts with GLM's [gMASK]<sop> prefix markers.
    gmask, sop = tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", gmask), ("<sop>", sop)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, additional_special_tokens=GLM_TOKENS, **SPECIAL_TOKENS
    )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    fast.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a local Hugging Face tokenizer folder (never a hub id)."""
    path = Path(path).expanduser()
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(
            f"no tokenizer at {path}: expected a local folder with tokenizer.json "
            "(hub ids are not fetched)"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def cached_tokenizer(
    texts: list[str], cache_dir: str | Path, vocab_size: int = 1024
) -> PreTrainedTokenizerBase:
    """Train once per (corpus, vocab size) and reuse from ``cache_dir``."""
    digest = hashlib.sha256(
        json.dumps([TOKENIZER_VERSION, vocab_size, sorted(set(texts))]).encode()
    ).hexdigest()[:12]
    folder = Path(cache_dir).expanduser() / f"tokenizer-{digest}"
    if (folder / "tokenizer.json").exists():
        return load_tokenizer(folder)
    return train_tokenizer(texts, folder, vocab_size)


# What a Hugging Face tokenizer folder can hold as text (``save_pretrained`` of transformers 5:
# tokenizer.json + tokenizer_config.json for fast tokenizers, the legacy maps, the slow BPE /
# WordPiece vocabularies and chat templates). Binary files (sentencepiece models) are not text.
TOKENIZER_FILE_NAMES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)


def tokenizer_from_files(files: dict[str, str]) -> PreTrainedTokenizerBase:
    """A tokenizer from its saved folder's files as text (as training checkpoints store them).

    The names come from a checkpoint, so only :data:`TOKENIZER_FILE_NAMES` are written, each inside
    a fresh temporary folder; any other entry (a path, ``..``, a non-string) raises naming it.
    """
    if not isinstance(files, dict):
        raise ValueError(f"tokenizer files must be a dict of name -> text, got {type(files)}")
    for name, text in files.items():
        if not isinstance(name, str) or name not in TOKENIZER_FILE_NAMES:
            raise ValueError(
                f"tokenizer file entry {name!r} is not a known tokenizer file name "
                f"(expected one of {', '.join(sorted(TOKENIZER_FILE_NAMES))})"
            )
        if not isinstance(text, str):
            raise ValueError(f"tokenizer file entry {name!r} holds {type(text).__name__}, not text")
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return load_tokenizer(tmp)
