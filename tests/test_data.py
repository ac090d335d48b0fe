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
    # depends on the texts only: same answer for a reordered list
    again = data.split_documents(list(reversed(docs)), 0.25)
    assert {d.id for d in again["heldout"]} == held


def test_copies_up_to_whitespace_are_one_document_on_one_side():
    texts = [f"Document {i} says something {i * 7}." for i in range(40)]
    docs = [data.Document(f"a{i:02d}", t) for i, t in enumerate(texts)]
    docs += [data.Document(f"b{i:02d}", "  " + t.replace(" ", "\n\t ") + "\n") for i, t in enumerate(texts)]
    split = data.split_documents(docs, 0.5)
    kept = [" ".join(d.text.split()) for s in split.values() for d in s]
    assert len(kept) == 40 and sorted(kept) == sorted(texts)  # one copy of each, the first by id
    assert all(d.id.startswith("a") for s in split.values() for d in s)
    # the split follows the content, not the id: renaming every document changes nothing
    renamed = data.split_documents([data.Document("z" + d.id, d.content) for d in docs], 0.5)
    assert [d.text for d in renamed["heldout"]] == [d.text for d in split["heldout"]]


def test_streamed_corpus_skips_copies_and_splits_by_content():
    texts = [f"streamed text number {i}" for i in range(30)]
    stream = [data.Document(f"s{i}", t) for i, t in enumerate(texts + [t + "  " for t in texts])]
    corpus = data.Corpus("stream", stream=lambda: iter(stream))
    held = [d.text for d in data.documents(corpus, "heldout", 0, 0.3)]
    train = [d.text for d in data.documents(corpus, "train", 0, 0.3)]
    assert len(held) + len(train) == 30 and not {t.strip() for t in held} & {t.strip() for t in train}


def test_mix_corpus_has_no_text_in_both_splits():
    split = data.split_documents(data.load_corpus("mix").load(), 0.05)
    keys = {s: {data.content_key(d.text) for d in docs} for s, docs in split.items()}
    assert not keys["heldout"] & keys["train"]
    assert sum(len(k) for k in keys.values()) == sum(len(d) for d in split.values())  # no copies left


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
