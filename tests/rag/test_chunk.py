"""lmforge.rag.chunk: sections at headings, paragraphs packed up to `size` tokens, long paragraphs cut at sentences,
words and characters, overlap between neighbours, and every chunk an exact slice of the document."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from test_documents import PAGE, make_pdf, write

from lmforge.errors import LmforgeError
from lmforge.rag.chunk import Chunk, chunk_document
from lmforge.rag.documents import Document, markdown_headings, read_document


def words(text: str) -> int:
    return len(text.split())


def quarter_chars(text: str) -> int:
    """A counter that is not additive over words, like a subword tokenizer's."""
    return (len(text) + 3) // 4


def check(doc: Document, chunks: list[Chunk], count: Callable[[str], int], size: int, overlap: int) -> None:
    """Everything that must hold for any document: exact slices, sizes, order, no text lost, no heading crossed,
    overlap only within a section and never over min(overlap, half the chunk)."""
    text = doc.text
    headings = [h[0] for h in markdown_headings(text)] if doc.kind in ("md", "html") else []
    covered = [False] * len(text)
    for c in chunks:
        assert c.source == doc.path
        assert c.text == text[c.start : c.end]
        assert c.text.strip()
        assert count(c.text) <= size, (c.text, count(c.text))
        assert not any(c.start < h < c.end for h in headings), c.text  # a heading only ever opens a chunk
        covered[c.start : c.end] = [True] * (c.end - c.start)
    assert all(covered[i] or text[i].isspace() for i in range(len(text))), "text lost between chunks"
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.start < b.start and a.end < b.end
        if b.start < a.end:
            assert a.title == b.title
            assert not any(a.start <= h < a.end for h in headings if h >= b.start)
            assert overlap > 0
            assert count(text[b.start : a.end]) <= min(overlap, count(a.text) // 2)
        if b.start in headings:  # a section's first chunk starts with its heading line
            assert b.start >= a.end


GUIDE = """Intro line.

# Install

Get the package from the index.

## From source

Clone the repository first. Then build it with make.

Run the tests. Install the result system wide.

Done.

# Usage

Call the tool with a file. It prints a summary.

```sh
# run it
tool file.txt
```
"""


def test_markdown_sections_exact() -> None:
    doc = Document("/docs/guide.md", GUIDE, "Guide", "md")
    chunks = chunk_document(doc, words, size=16, overlap=6)
    expected = [
        ("Guide", "Intro line."),
        ("Install", "# Install\n\nGet the package from the index."),
        ("Install > From source", "## From source\n\nClone the repository first. Then build it with make."),
        # the second chunk repeats the last sentence (5 tokens <= min(6, 12 // 2)) of the first
        ("Install > From source",
         "Then build it with make.\n\nRun the tests. Install the result system wide.\n\nDone."),
        ("Usage", "# Usage\n\nCall the tool with a file. It prints a summary."),
        # "# run it" is inside a code fence: a comment, not a heading
        ("Usage", "It prints a summary.\n\n```sh\n# run it\ntool file.txt\n```"),
    ]
    assert [(c.title, c.text) for c in chunks] == expected
    assert [(c.start, c.end) for c in chunks] == [(GUIDE.index(t), GUIDE.index(t) + len(t)) for _, t in expected]
    assert all(c.source == "/docs/guide.md" for c in chunks)
    check(doc, chunks, words, 16, 6)


def test_without_overlap_chunks_tile_the_text() -> None:
    doc = Document("g", GUIDE, "Guide", "md")
    chunks = chunk_document(doc, words, size=16, overlap=0)
    assert [c.text for c in chunks][2:4] == [
        "## From source\n\nClone the repository first. Then build it with make.",
        "Run the tests. Install the result system wide.\n\nDone.",
    ]
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:], strict=False))
    check(doc, chunks, words, 16, 0)


def test_heading_path() -> None:
    text = "# A\n\na\n\n### C\n\nc\n\n## B\n\nb\n\n#### D\nd\n\n# E #\n\ne\n\n## \n\nf\n"
    chunks = chunk_document(Document("p", text, "Doc", "md"), words, size=16, overlap=0)
    assert [(c.title, c.text) for c in chunks] == [
        ("A", "# A\n\na"), ("A > C", "### C\n\nc"), ("A > B", "## B\n\nb"), ("A > B > D", "#### D\nd"),
        ("E", "# E #\n\ne"), ("E", "## \n\nf")]  # an empty heading adds nothing to the path


def test_plain_text_has_no_headings() -> None:
    text = "# not a heading\n\nbody one\n\n# nor this\n\nbody two\n"
    for kind in ("txt", "pdf", "jsonl"):
        chunks = chunk_document(Document("t", text, "Notes", kind), words, size=16, overlap=0)
        assert [(c.title, c.text) for c in chunks] == [("Notes", text.strip())]


SENTENCES = [f"Sentence {i} has five words." for i in range(10)]


def test_long_paragraph_cut_at_sentences() -> None:
    text = " ".join(SENTENCES)
    doc = Document("s", text, "S", "txt")
    plain = chunk_document(doc, words, size=16, overlap=0)
    assert [c.text for c in plain] == [" ".join(SENTENCES[i : i + 3]) for i in (0, 3, 6)] + [SENTENCES[9]]
    overlapping = chunk_document(doc, words, size=16, overlap=6)
    # each chunk after the first starts again at the last sentence of the one before
    assert [c.text for c in overlapping] == [" ".join(SENTENCES[i : i + 3]) for i in (0, 2, 4, 6)] + [
        " ".join(SENTENCES[8:])]
    check(doc, overlapping, words, 16, 6)


def test_heading_opens_first_chunk_even_before_a_long_paragraph() -> None:
    text = "## Long\n" + " ".join(SENTENCES)
    chunks = chunk_document(Document("l", text, "L", "md"), words, size=16, overlap=0)
    assert chunks[0].text == "## Long\n" + " ".join(SENTENCES[:2])
    assert {c.title for c in chunks} == {"Long"}


def test_sentence_ends() -> None:
    text = ('He said "stop." Then, why me? Really, truly! はい、そうですね、本当に。次の行へ進みましょう\n'
            "then the e.g. case here.")
    # counting characters with size 20, no two of these sentences (10 characters or more each) fit in one chunk
    chunks = chunk_document(Document("e", text, "E", "txt"), len, size=20, overlap=0)
    assert [c.text for c in chunks] == [  # "e.g. " ends a sentence too
        'He said "stop."', "Then, why me?", "Really, truly!", "はい、そうですね、本当に。", "次の行へ進みましょう",
        "then the e.g.", "case here."]


def test_long_sentence_cut_at_words_and_long_word_at_characters() -> None:
    text = " ".join(f"w{i}" for i in range(40))
    chunks = chunk_document(Document("w", text, "W", "txt"), words, size=16, overlap=0)
    assert [words(c.text) for c in chunks] == [16, 16, 8]
    assert chunks[1].text == " ".join(f"w{i}" for i in range(16, 32))
    blob = "x" * 50
    chunks = chunk_document(Document("x", f"{blob} tail", "X", "txt"), len, size=16, overlap=5)
    # cut into size - overlap = 11 characters, the pieces a sliding window with overlap 5 would take
    assert [c.text for c in chunks] == ["x" * 11] * 4 + ["x" * 6 + " tail"]


def test_word_overlap_when_no_sentence_fits() -> None:
    # one unpunctuated sentence: cut into runs of size - overlap = 12 words, and with no sentence start to go
    # back to, each chunk after the first goes back 4 words
    text = " ".join(f"w{i}" for i in range(30))
    chunks = chunk_document(Document("w", text, "W", "txt"), words, size=16, overlap=4)
    assert [c.text for c in chunks] == [" ".join(f"w{i}" for i in range(a, b)) for a, b in [(0, 12), (8, 24), (20, 30)]]
    check(Document("w", text, "W", "txt"), chunks, words, 16, 4)


def test_edge_documents() -> None:
    assert chunk_document(Document("e", "", "E", "md"), words) == []
    assert chunk_document(Document("e", " \n\n\t\n", "E", "md"), words) == []
    only = chunk_document(Document("h", "# Title\n\n\n", "H", "md"), words)
    assert [(c.title, c.text, c.start, c.end) for c in only] == [("Title", "# Title", 0, 7)]
    indented = chunk_document(Document("i", "\n\n    code line\n  more\n\n", "I", "txt"), words)
    assert [c.text for c in indented] == ["    code line\n  more"]  # the first line's indentation is kept


@pytest.mark.parametrize(("size", "overlap", "message"), [
    (15, 0, "chunk size must be at least 16 tokens, got 15"),
    (16, 8, "overlap must be from 0 to 7 tokens for chunks of 16, got 8"),
    (200, -1, "overlap must be from 0 to 99 tokens for chunks of 200, got -1"),
    (200, 100, "overlap must be from 0 to 99 tokens for chunks of 200, got 100"),
])
def test_validation(size: int, overlap: int, message: str) -> None:
    with pytest.raises(LmforgeError) as e:
        chunk_document(Document("v", "text", "V", "txt"), words, size, overlap)
    assert str(e.value) == message


def test_validation_bounds_accepted() -> None:
    assert [c.text for c in chunk_document(Document("v", "text", "V", "txt"), words, 16, 7)] == ["text"]


VOCAB = ["alpha", "beta", "gamma", "delta", "x", "naïve", "東京", "emoji😀", "e.g.", "Mr.", "(a)", "--", "#tag", "42"]


def random_text(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(0, 40)):
        kind = rng.random()
        if kind < 0.12:
            heading = " ".join(rng.choices(VOCAB, k=rng.randint(0, 3)))
            lines.append("#" * rng.randint(1, 7) + " " * rng.randint(0, 2) + heading)
        elif kind < 0.3:
            lines.append(rng.choice(["", "", " ", "\t", "```", "~~~", "```py"]))
        elif kind < 0.35:
            lines.append("z" * rng.randint(20, 120))  # one word longer than a chunk
        else:
            sentence = []
            for _ in range(rng.randint(1, 30)):
                sentence.append(rng.choice(VOCAB) + rng.choice(["", "", "", ".", "!", "?", ",", '."', "。"]))
            lines.append(" " * rng.randint(0, 3) + rng.choice([" ", "  ", "\t"]).join(sentence))
    return "\n".join(lines) + rng.choice(["", "\n", "\n\n", "  "])


@pytest.mark.parametrize("count", [words, quarter_chars], ids=["words", "quarter-chars"])
def test_random_documents(count: Callable[[str], int]) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        text = random_text(rng)
        size = rng.randint(16, 48)
        overlap = rng.randint(0, size // 2 - 1)
        for kind in ("md", "txt"):
            doc = Document("r", text, "Random", kind)
            check(doc, chunk_document(doc, count, size, overlap), count, size, overlap)


def fixture_documents(folder: Path) -> list[Document]:
    guide = write(folder / "guide.md", GUIDE)
    page = write(folder / "page.html", PAGE)
    pdf = write(folder / "doc.pdf", make_pdf(["First page words " * 12, "Second page. Short."], title="PDF"))
    rows = write(folder / "rows.jsonl", '{"text": "' + "row text. " * 30 + '"}\n{"text": "short"}\n')
    notes = write(folder / "notes.txt", "\n\n".join(" ".join(SENTENCES[: i + 1]) for i in range(10)))
    return [d for f in (guide, page, pdf, rows, notes) for d in read_document(f)]


def test_fixture_documents(tmp_path: Path) -> None:
    docs = fixture_documents(tmp_path)
    assert [d.kind for d in docs] == ["md", "html", "pdf", "jsonl", "jsonl", "txt"]
    for doc in docs:
        for size, overlap in [(16, 0), (16, 7), (24, 5), (200, 40)]:
            chunks = chunk_document(doc, words, size, overlap)
            assert chunks
            check(doc, chunks, words, size, overlap)
    html = chunk_document(docs[1], words, 200, 40)
    assert [c.title for c in html] == ["Fish & Chips", "Frying fish", "Frying fish > Batter"]


@pytest.mark.slow
def test_real_tokenizer(tmp_path: Path) -> None:
    from lmforge.embeddings import load_encoder

    _, tok = load_encoder()

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    rng = random.Random(7)
    paragraphs = []
    for i in range(40):
        sentences = [" ".join(rng.choices(VOCAB[:9] + ["tokenization", "retrieval", "über", "Straße"],
                                          k=rng.randint(3, 25))) + "." for _ in range(rng.randint(1, 6))]
        paragraphs.append((f"## Part {i}\n\n" if i % 7 == 0 else "") + " ".join(sentences))
    text = "# Manual\n\n" + "\n\n".join(paragraphs) + "\n\n" + "Supercalifragilistic" * 40
    doc = Document("m", text, "Manual", "md")
    for size, overlap in [(32, 8), (64, 16), (128, 0)]:
        chunks = chunk_document(doc, count, size, overlap)
        check(doc, chunks, count, size, overlap)
        assert sum(count(c.text) for c in chunks) / len(chunks) > size / 3  # packed, not one sentence per chunk
        assert any(b.start < a.end for a, b in zip(chunks, chunks[1:], strict=False)) == (overlap > 0)
    for doc in fixture_documents(tmp_path):
        check(doc, chunk_document(doc, count, 32, 8), count, 32, 8)


def test_counts_stay_linear() -> None:
    """Chunking counts each stretch of text a few times, not once per candidate boundary: the characters handed to
    count_tokens stay a small multiple of the document's, structured or one unbroken run of words."""
    rng = random.Random(3)
    paragraphs = [" ".join(" ".join(rng.choices(VOCAB, k=rng.randint(3, 20))) + "." for _ in range(rng.randint(1, 8)))
                  for _ in range(400)]
    structured = "# Doc\n\n" + "\n\n".join(paragraphs)
    wall = " ".join(rng.choices(VOCAB[:5], k=20000))
    for text, bound in [(structured, 6), (wall, 10)]:  # about 4 and 7 now; cost per candidate would be 50+
        counted: list[int] = []

        def count(s: str, counted: list[int] = counted) -> int:
            counted.append(len(s))
            return words(s)

        chunks = chunk_document(Document("c", text, "C", "md"), count, size=64, overlap=16)
        check(Document("c", text, "C", "md"), chunks, words, 64, 16)
        assert sum(counted) < bound * len(text), sum(counted) / len(text)
