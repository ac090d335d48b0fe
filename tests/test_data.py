import json

import pytest
import torch

from circuitsae import data
from circuitsae.errors import CircuitSAEError


def test_folder_corpus_split_is_disjoint_and_stable(text_corpus):
    docs = data.load_corpus(str(text_corpus)).load()
    assert len(docs) == 12
    split = data.split_documents(docs, 0.25)
    held, train = {d.id for d in split["heldout"]}, {d.id for d in split["train"]}
    assert len(held) == 3 and len(train) == 9 and not held & train
    # depends on the ids only: same answer for a reordered list
    again = data.split_documents(list(reversed(docs)), 0.25)
    assert {d.id for d in again["heldout"]} == held


def test_contexts_shape_start_token_and_determinism(tiny_llama, text_corpus):
    tok = tiny_llama.tokenizer
    a = data.contexts(tok, 10, 32, str(text_corpus), "train", seed=0, heldout_fraction=0.25)
    b = data.contexts(tok, 10, 32, str(text_corpus), "train", seed=0, heldout_fraction=0.25)
    c = data.contexts(tok, 10, 32, str(text_corpus), "train", seed=1, heldout_fraction=0.25)
    assert a.shape == (10, 32) and a.dtype == torch.long
    assert (a[:, 0] == tok.bos_token_id).all()
    assert (a[:, 1:] != tok.bos_token_id).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_heldout_contexts_come_from_heldout_documents(tiny_llama, text_corpus):
    tok = tiny_llama.tokenizer
    docs = data.load_corpus(str(text_corpus)).load()
    held_ids = {d.id for d in data.split_documents(docs, 0.25)["heldout"]}
    held = data.contexts(tok, 4, 32, str(text_corpus), "heldout", heldout_fraction=0.25)
    text = tok.decode(held.flatten())
    numbers = {f"doc{int(w.rstrip('.')):02d}.txt" for w in text.split("Document ")[1:] for w in [w.split()[0]]}
    assert numbers and numbers <= held_ids


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph.\n\nsecond one.\n\n\n")
    assert [d.text for d in data.load_corpus(str(txt)).load()] == ["first paragraph.", "second one."]
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps("plain string") + "\n")
    assert [d.text for d in data.load_corpus(str(jl)).load()] == ["hello", "plain string"]
    jl.write_text('{"body": 1}\n')
    with pytest.raises(CircuitSAEError, match=r'b.jsonl:1 has no "text"'):
        data.load_corpus(str(jl)).load()


def test_embedded_corpora_are_real_text():
    sotu = data.load_corpus("sotu").load()
    bbc = data.load_corpus("bbc").load()
    assert len(sotu) == 249 and len(bbc) == 2225
    assert "Fellow-Citizens" in sotu[0].text
    assert len(data.load_corpus("mix").load()) == 249 + 2225


def test_bad_corpora_are_clear(tiny_llama, tmp_path):
    tok = tiny_llama.tokenizer
    (tmp_path / "empty").mkdir()
    with pytest.raises(CircuitSAEError, match="holds no text"):
        data.contexts(tok, 1, 16, str(tmp_path / "empty"))
    with pytest.raises(CircuitSAEError, match="does not exist"):
        data.load_corpus(str(tmp_path / "missing.txt"))
    small = tmp_path / "small.txt"
    small.write_text("just a few words here.\n\nand a few more.")
    with pytest.raises(CircuitSAEError, match="yields only 0 contexts"):
        data.contexts(tok, 5, 64, str(small))
