import re

import pytest
from transformers import AutoTokenizer

from autoglm_phone.tokenizer import (
    GLM_TOKENS,
    SPECIAL_TOKENS,
    cached_tokenizer,
    load_tokenizer,
    tokenizer_from_files,
)

TEXTS = [
    "two small red circles on the left",
    "one large blue square in the center",
    "three quiet low buzzy beeps, rising",
] * 20


def test_round_trip_and_special_tokens(tmp_path):
    tok = cached_tokenizer(TEXTS, tmp_path, vocab_size=400)
    for text in set(TEXTS) | {"an unseen sentence: 7 purple stars!"}:
        ids = tok(text)["input_ids"]
        assert ids[:2] == tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])
        assert tok.decode(ids, skip_special_tokens=True) == text
    for t in list(SPECIAL_TOKENS.values()) + GLM_TOKENS:
        assert t == tok.unk_token or tok.convert_tokens_to_ids(t) != tok.unk_token_id, t
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert tok.pad_token == SPECIAL_TOKENS["pad_token"]


def test_saved_folder_loads_with_transformers(tmp_path):
    tok = cached_tokenizer(TEXTS, tmp_path, vocab_size=400)
    folder = next(tmp_path.glob("tokenizer-*"))
    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert hf("one large blue square")["input_ids"] == tok("one large blue square")["input_ids"]
    assert len(hf) == len(tok)


def test_cache_is_reused_and_keyed_by_corpus(tmp_path):
    cached_tokenizer(TEXTS, tmp_path, vocab_size=400)
    cached_tokenizer(TEXTS, tmp_path, vocab_size=400)
    assert len(list(tmp_path.glob("tokenizer-*"))) == 1
    cached_tokenizer(TEXTS + ["a new word: zebra"], tmp_path, vocab_size=400)
    assert len(list(tmp_path.glob("tokenizer-*"))) == 2


def test_missing_local_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nope")


def _saved_files(tmp_path) -> dict[str, str]:
    tok = cached_tokenizer(TEXTS, tmp_path / "cache", vocab_size=400)
    tok.save_pretrained(tmp_path / "saved")  # what training checkpoints store, as text
    return {p.name: p.read_text() for p in (tmp_path / "saved").iterdir()}


def test_tokenizer_from_files_round_trip(tmp_path):
    files = _saved_files(tmp_path)
    tok = tokenizer_from_files(files)
    assert (
        tok("one large blue square")["input_ids"]
        == load_tokenizer(tmp_path / "saved")("one large blue square")["input_ids"]
    )
    with pytest.raises(ValueError, match="'tokenizer.json' holds bytes"):
        tokenizer_from_files({**files, "tokenizer.json": b"{}"})


@pytest.mark.parametrize(
    "name", ["ABSOLUTE", "../escaped.json", "sub/tokenizer.json", "model.bin", "..", 3]
)
def test_tokenizer_from_files_refuses_unknown_entries(tmp_path, name):
    """Names come from a checkpoint: none may write outside a fresh folder, or anything unknown."""
    if name == "ABSOLUTE":
        name = str(tmp_path / "outside.json")
    files = {**_saved_files(tmp_path), name: "{}"}
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        tokenizer_from_files(files)
    assert not (tmp_path / "outside.json").exists() and not (tmp_path / "escaped.json").exists()
