"""Index, retrieve, answer and evaluate on a small corpus written for these tests, with the real MiniLM
embeddings: incremental re-indexing, an interrupted run, hybrid retrieval, citations and grounding, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.rag import evaluate_rag, read_qa, token_f1
from lmforge.rag.answer import NOTHING, answer, check_grounding, citations, prompt_messages
from lmforge.rag.index import index_paths
from lmforge.rag.retrieve import search
from lmforge.rag.store import open_store

CORPUS = {
    "boiler.md": "# Boiler maintenance\n\nTo replace the XK-47 pressure valve, shut off the water supply, drain the "
                 "tank and unscrew the old valve with a 22 mm spanner.\n\n## Safety\n\nAlways let the boiler cool "
                 "for two hours before you service it, and wear gloves.\n",
    "festival.md": "# The Zorblax festival\n\nThe Zorblax festival is held every March in the town of Quibbleton. "
                   "It celebrates the founding of the town by the weaver Ada Pennywhistle in 1742.\n",
    "garden.txt": "Growing tomatoes\n\nTomatoes need full sun and regular watering. Pinch out the side shoots every "
                  "week so the plant puts its energy into fruit.\n\nRoses bloom in June and like rich soil.\n",
    "notes/rocket.html": "<html><head><title>Rocket notes</title><style>p {color: red}</style></head><body>"
                         "<h1>Rocket engines</h1><p>The Vulcan-9 engine burns liquid methane and liquid oxygen.</p>"
                         "<script>alert('no')</script></body></html>",
}


def write_corpus(root: Path, files: dict[str, str] = CORPUS) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "docs")


@pytest.fixture
def store(tmp_path, corpus):
    s = open_store(tmp_path / "store.db")
    index_paths([corpus], s)
    yield s
    s.close()


def sources(hits) -> list[str]:
    return [Path(h.source).name for h in hits]


# ---- indexing ---------------------------------------------------------------------------------------------


def test_incremental_reindex_adds_updates_removes_and_skips(tmp_path, corpus):
    store = open_store(tmp_path / "s.db")
    first = index_paths([corpus], store)
    assert len(first.added) == 4 and first.unchanged == 0 and first.total == first.chunks > 0
    again = index_paths([corpus], store)
    assert (again.added, again.updated, again.removed, again.unchanged, again.chunks) == ([], [], [], 4, 0)
    (corpus / "garden.txt").write_text("Growing potatoes\n\nPotatoes like loose soil and cool weather.\n")
    (corpus / "festival.md").unlink()
    (corpus / "new.md").write_text("# Bees\n\nHoney bees dance to tell each other where flowers are.\n")
    third = index_paths([corpus], store)
    assert [Path(p).name for p in third.added] == ["new.md"]
    assert [Path(p).name for p in third.updated] == ["garden.txt"]
    assert [Path(p).name for p in third.removed] == ["festival.md"] and third.unchanged == 2
    assert sources(search(store, "Zorblax festival Quibbleton", 3, "bm25")) == []
    assert sources(search(store, "potatoes loose soil", 1))[0] == "garden.txt"
    assert sources(search(store, "honey bees dance", 1)) == ["new.md"]
    assert "tomatoes" not in " ".join(h.text.lower() for h in search(store, "tomatoes", 5, "bm25"))


def test_indexing_another_folder_keeps_the_first(tmp_path, corpus):
    store = open_store(tmp_path / "s.db")
    index_paths([corpus], store)
    other = write_corpus(tmp_path / "other", {"x.md": "# X\n\nA note about zebras.\n"})
    report = index_paths([other], store)
    assert report.removed == [] and len(report.added) == 1
    assert {Path(p).name for p in store.file_hashes()} == {"boiler.md", "festival.md", "garden.txt", "rocket.html",
                                                            "x.md"}


def test_an_interrupted_run_leaves_a_consistent_store_and_the_next_run_finishes(tmp_path, corpus, monkeypatch):
    store = open_store(tmp_path / "s.db")
    import lmforge.embeddings as embeddings  # index_paths imports embed when it runs: patch the library's

    calls = {"n": 0}

    original = embeddings.embed

    def flaky(texts, model, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(texts, model, *a, **k)

    monkeypatch.setattr(embeddings, "embed", flaky)
    with pytest.raises(KeyboardInterrupt):
        index_paths([corpus], store)
    done = store.file_hashes()
    assert len(done) == 2 and store.count() > 0  # two whole files, nothing of the third
    monkeypatch.setattr(embeddings, "embed", original)
    report = index_paths([corpus], store)
    assert report.unchanged == 2 and len(report.added) == 2 and len(store.file_hashes()) == 4


def test_bad_inputs_stop_before_anything_is_written(tmp_path, corpus):
    (corpus / "broken.jsonl").write_text('{"text": "fine"}\n{"no_text": 1}\n')
    store = open_store(tmp_path / "s.db")
    with pytest.raises(LmforgeError, match="broken.jsonl line 2"):
        index_paths([corpus], store)
    assert store.count() == 0 and store.file_hashes() == {}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmforgeError, match="empty"):
        index_paths([empty], store)


# ---- retrieval -----------------------------------------------------------------------------------------------


def test_search_finds_by_keyword_and_by_meaning_and_filters_by_source(store):
    assert sources(search(store, "XK-47", 1, "bm25")) == ["boiler.md"]
    assert sources(search(store, "which fuel does the Vulcan-9 burn", 1)) == ["rocket.html"]
    assert sources(search(store, "when do flowers with thorns open their blossoms", 1, "dense")) == ["garden.txt"]
    only = search(store, "water", 5, source_glob="*.txt")
    assert only and set(sources(only)) == {"garden.txt"}
    hit = search(store, "Ada Pennywhistle", 1)[0]
    assert hit.title == "The Zorblax festival" and "Pennywhistle" in hit.text
    assert Path(hit.source).read_text()[hit.start : hit.end] == hit.text  # the span points into the file


HYBRID_CORPUS = {
    "history.md": "# Company history\n\nThe workshop opened in a former mill beside the canal. For decades it repaired "
                  "looms and later moved into heating equipment. Its founders kept detailed ledgers, many of which "
                  "survive in the county archive, and the building still carries the painted sign of the original "
                  "owners. Among the parts it made, the Thornbury R7 became the best known. The site closed in 1998 "
                  "and is now a museum of local industry with guided walks on Sundays.\n",
    "town.md": "# Town life\n\nEvery spring the square fills with stalls selling bread, cheese and wool. Musicians "
               "play until late and children race wooden boats on the river. Local histories say the first gathering "
               "was arranged by Ada Pennywhistle. The council now sponsors lanterns along the bridge and a parade of "
               "decorated carts.\n",
    "prices.md": "# Spare part prices\n\nReplacement heating components are priced differently by each supplier.\n",
    "bio.md": "# Life stories\n\nShort life stories of inventors and craftswomen.\n",
    "people.md": "# Famous founders\n\nGrace Hopper wrote one of the first compilers.\n",
    "fuel.md": "# Rocket engines\n\nThe engine burns liquid methane and liquid oxygen.\n",
    "garden.md": "# Tomatoes\n\nTomatoes need full sun and regular watering.\n",
}


def test_hybrid_beats_either_list_alone(tmp_path):
    # a rare name in a long text that a short, on-topic text outranks by meaning (dense misses it), and
    # paraphrases that share no word with their answer (BM25 finds nothing): only the fusion gets all first
    store = open_store(tmp_path / "h.db")
    index_paths([write_corpus(tmp_path / "h", HYBRID_CORPUS)], store)
    rows = [("Thornbury R7 cost", "history.md"), ("Pennywhistle biography", "town.md"),
            ("propellant powering motors", "fuel.md"), ("crops wanting bright sunshine", "garden.md")]

    def ranks(mode: str) -> list[int | None]:
        return [next((h.rank for h in search(store, q, 4, mode) if Path(h.source).name == want), None)
                for q, want in rows]

    assert ranks("hybrid") == [1, 1, 1, 1]
    assert ranks("bm25") == [1, 1, None, None]
    assert ranks("dense")[1] == 2  # the life-stories page looks closer to "biography" than the town's page


# ---- answers ------------------------------------------------------------------------------------------------


def test_citations_point_at_the_numbered_chunks(store):
    seen: list = []

    def scripted(messages):  # a generator that answers with the first sentence of source 2 of its prompt
        seen.append(messages)
        block = re.split(r"\n\n\[3\] |\n\nQuestion: ", messages[1]["content"].split("\n\n[2] ", 1)[1])[0]
        body = [line for line in block.splitlines()[1:] if line and not line.startswith("#")]
        yield body[0].split(". ")[0].rstrip(".") + ". [2]"

    got = answer("Where is the Zorblax festival held and who founded the town?", store, scripted, k=3)
    assert got.found and got.cited == [2]
    cited = got.sources[1]
    assert cited.rank == 2 and got.text.removesuffix(" [2]") in cited.text
    assert f"[2] {cited.title}\n{cited.text.strip()}" in seen[0][1]["content"]
    assert got.sentences and all(s.supported for s in got.sentences) and got.sentences[0].source == 2
    assert got.groundedness == 1.0


def test_unsupported_sentences_are_flagged(store):
    hits = search(store, "Zorblax festival", 2)
    checks = check_grounding("The Zorblax festival is held every March in Quibbleton. The moon is made of "
                             "green cheese and orbits Jupiter.", hits, "minilm-l6")
    assert [c.supported for c in checks] == [True, False]


def test_nothing_relevant_means_no_guess(store):
    def never(messages):
        raise AssertionError("the model must not be asked")

    got = answer("What is the airspeed velocity of an unladen swallow?", store, never, min_score=0.5)
    assert not got.found and got.text == NOTHING


def test_citation_parsing_and_prompt_numbering(store):
    assert citations("A [1]. B [3, 2]. C [2][9] [x]", 3) == [1, 3, 2]
    hits = search(store, "tomatoes", 2)
    content = prompt_messages("q?", hits)[1]["content"]
    assert content.index("[1] ") < content.index("[2] ") and content.endswith("Question: q?")


# ---- evaluation ------------------------------------------------------------------------------------------------


def test_eval_rag_scores_retrieval_and_answers(tmp_path, store):
    qa = tmp_path / "qa.jsonl"
    rows = [{"question": "Where is the Zorblax festival held?", "answer": "Quibbleton", "source": "festival.md"},
            {"question": "What does the Vulcan-9 engine burn?", "answer": "liquid methane and liquid oxygen",
             "source": "notes/rocket.html"},
            {"question": "What size spanner undoes the XK-47 valve?", "answer": "22 mm", "source": "boiler.md"}]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate_rag(store, read_qa(qa), k=3)
    assert result["summary"]["recall@3"] == 1.0 and result["summary"]["mrr"] == 1.0
    assert [r["rank"] for r in result["rows"]] == [1, 1, 1]

    def echo(messages):  # answers with the gold answer of the question it sees: exact match 1
        question = messages[1]["content"].rsplit("Question: ", 1)[1]
        yield next(r["answer"] for r in rows if r["question"] == question)

    scored = evaluate_rag(store, read_qa(qa), echo, k=3)["summary"]
    assert scored["exact"] == 1.0 and scored["f1"] == 1.0 and scored["answer_s_p95"] >= scored["answer_s_p50"]
    precision, recall = 1.0, 2 / 5
    f1 = 2 * precision * recall / (precision + recall)
    assert token_f1("the liquid methane", "liquid methane and liquid oxygen") == pytest.approx(f1)
    qa.write_text('{"question": "x"}\n')
    with pytest.raises(LmforgeError, match="line 1"):
        read_qa(qa)


# ---- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_index_search_and_errors(tmp_path, corpus, capsys):
    db = tmp_path / "cli.db"
    assert main(["rag", "index", str(corpus), "--store", str(db)]) == 0
    assert "4 files (4 added" in capsys.readouterr().err
    assert main(["rag", "search", "XK-47 valve", "--store", str(db), "--k", "2", "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2] and Path(hits[0]["source"]).name == "boiler.md"
    assert set(hits[0]) >= {"rank", "score", "source", "title", "text"}
    missing = tmp_path / "missing.db"
    assert main(["rag", "search", "x", "--store", str(missing)]) == 2
    assert "no store at" in capsys.readouterr().err and not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    fresh = tmp_path / "fresh.db"
    assert main(["rag", "index", str(empty), "--store", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and not fresh.exists()  # a failed first run leaves no store


@pytest.mark.slow
def test_ask_with_the_real_model_answers_from_the_documents(tmp_path, store, capsys):
    db = store.path
    store.close()
    assert main(["rag", "ask", "Where is the Zorblax festival held?", "--store", str(db), "--temperature", "0",
                 "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["found"] and "Quibbleton" in got["answer"]
    assert Path(got["sources"][0]["source"]).name == "festival.md"
    assert got["groundedness"] > 0
