"""lmforge.rag.documents: which files are found, and each kind (txt, md, html, pdf, jsonl) read to exact text,
with a one-line LmforgeError for every file that cannot be read."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pypdf
import pytest

from lmforge.errors import LmforgeError
from lmforge.rag.documents import SUFFIXES, Document, content_hash, find_files, load_documents, read_document


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    """A minimal valid PDF written by hand: one Helvetica text line per page, a correct xref table, and an /Info
    dictionary when a title is given. Page texts must not hold PDF string specials: ( ) \\."""
    n = len(pages)
    font = 3 + 2 * n
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{' '.join(f'{3 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>".encode(),
    ]
    for i, text in enumerate(pages):
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 {font} 0 R "
                       f">> >> /Contents {4 + 2 * i} 0 R >>".encode())
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    if title is not None:
        objects.append(f"<< /Title ({title}) >>".encode())
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    info = f" /Info {len(objects)} 0 R" if title is not None else ""
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_bytes(content.encode())
    else:
        path.write_bytes(content)
    return path


def read_one(path: Path) -> Document:
    docs = read_document(path)
    assert len(docs) == 1
    return docs[0]


# finding files -----------------------------------------------------------------------------------------------------


def test_find_files_walks_folders_sorted_skipping_hidden_and_unsupported(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    for name in ["b.md", "a.txt", "sub/c.html", "sub/deeper/d.PDF", "sub/e.htm", "f.markdown", "g.jsonl",
                 "skip.py", "notes.docx", ".hidden.txt", ".git/config.txt", "sub/.cache/x.md", "noext"]:
        write(root / name, "x")
    (root / "empty.txt").mkdir()  # a folder named like a document is not a file
    found = find_files([root])
    assert [p.relative_to(root).as_posix() for p in found] == [
        "a.txt", "b.md", "f.markdown", "g.jsonl", "sub/c.html", "sub/deeper/d.PDF", "sub/e.htm"]
    assert all(p.is_file() for p in found)


def test_find_files_keeps_given_order_and_drops_repeats(tmp_path: Path) -> None:
    one = write(tmp_path / "z.txt", "x")
    two = write(tmp_path / "sub" / "a.md", "x")
    hidden = write(tmp_path / ".secret.md", "x")  # named explicitly: taken
    found = find_files([one, str(tmp_path / "sub"), two, hidden, tmp_path / "sub" / ".." / "z.txt"])
    assert found == [one, two, hidden]


def test_find_files_errors(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match=r"^no such file or folder: .*missing\.txt$"):
        find_files([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError) as e:
        find_files([tmp_path / "empty"])
    assert str(e.value) == f"{tmp_path / 'empty'} holds no supported files ({', '.join(SUFFIXES)})"
    write(tmp_path / "code" / "main.py", "print()")
    write(tmp_path / "code" / ".hidden.md", "# hidden")
    with pytest.raises(LmforgeError, match="holds no supported files"):
        find_files([tmp_path / "code"])
    with pytest.raises(LmforgeError, match=r"main\.py: unsupported file type '\.py' \(supported: \.txt, \.md"):
        find_files([tmp_path / "code" / "main.py"])
    with pytest.raises(LmforgeError, match=r"unsupported file type '\.py'"):
        read_document(tmp_path / "code" / "main.py")
    good = write(tmp_path / "ok.txt", "fine")
    with pytest.raises(LmforgeError, match="no such file or folder"):  # one bad path fails the whole list
        find_files([good, tmp_path / "nope"])


def test_find_files_dangling_symlink_is_missing(tmp_path: Path) -> None:
    (tmp_path / "link.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(LmforgeError, match="no such file or folder"):
        find_files([tmp_path / "link.txt"])


# txt and md ----------------------------------------------------------------------------------------------------------


def test_txt(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.txt", "\n  \n   " + "A" * 100 + "  \r\nsecond line\rthird\n")
    doc = read_one(path)
    assert doc == Document(str(path.resolve()), "\n  \n   " + "A" * 100 + "  \nsecond line\nthird\n", "A" * 80, "txt")
    assert os.path.isabs(doc.path)
    assert read_one(write(tmp_path / "blank.txt", " \n\n")).title == "blank"
    assert read_one(write(tmp_path / "bom.txt", "\ufeffHi there")).text == "Hi there"


def test_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "rel.md", "# Rel")
    monkeypatch.chdir(tmp_path)
    assert read_one(Path("rel.md")).path == str((tmp_path / "rel.md").resolve())


def test_md_title_is_first_h1(tmp_path: Path) -> None:
    text = "intro\n```sh\n# not a heading\n```\n## Second level\n# The Title #\ntext\n# Later\n"
    doc = read_one(write(tmp_path / "guide.md", text))
    assert (doc.text, doc.title, doc.kind) == (text, "The Title", "md")
    assert read_one(write(tmp_path / "plain.markdown", "#hashtag\n## only h2\n")).title == "plain"
    assert read_one(write(tmp_path / "csharp.md", "# C#\n")).title == "C#"


def test_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.txt", "caf\u00e9".encode("latin-1"))
    with pytest.raises(LmforgeError) as e:
        read_document(path)
    assert str(e.value) == f"{path} is not UTF-8 text (byte 0xe9 at offset 3)"
    with pytest.raises(LmforgeError, match=r"is not UTF-8 text \(byte 0xff at offset 0\)"):
        read_document(write(tmp_path / "bad.md", b"\xff# x"))


def test_binary(tmp_path: Path) -> None:
    path = write(tmp_path / "image.md", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(LmforgeError, match=r"image\.md looks binary"):
        read_document(path)
    with pytest.raises(LmforgeError, match="looks binary"):
        read_document(write(tmp_path / "page.html", b"<p>a\x00b</p>"))


def test_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    with pytest.raises(LmforgeError, match=r"^cannot read .*folder\.txt: Is a directory$"):
        read_document(folder)
    with pytest.raises(LmforgeError, match=r"^cannot read .*folder\.txt: "):
        content_hash(folder)
    link = tmp_path / "link.md"
    link.symlink_to(tmp_path / "gone.md")
    with pytest.raises(LmforgeError, match=r"^cannot read .*link\.md: No such file or directory$"):
        read_document(link)
    if os.geteuid() != 0:  # root reads through any permission bits
        locked = write(tmp_path / "locked.txt", "secret")
        locked.chmod(0)
        try:
            with pytest.raises(LmforgeError, match=r"^cannot read .*locked\.txt: Permission denied$"):
                read_document(locked)
        finally:
            locked.chmod(0o644)


# html --------------------------------------------------------------------------------------------------------------

PAGE = """<!DOCTYPE html>
<html><head>
  <meta charset="utf-8"><title>  Fish &amp; Chips  </title>
  <style>p { color: red }</style>
  <script>var s = "<p>not text</p>";</script>
</head>
<body>
<nav><a href="/">Home</a></nav>
<h1>Frying <em>fish</em></h1>
<p>Heat the   oil to 180&deg;C
   &mdash; not more.</p>
<p>Use a <b>deep</b> pan&nbsp;&lt;here&gt;.<br>New line in the same paragraph.</p>
<noscript>Turn on JavaScript</noscript><template><p>hidden template</p></template>
<h2>Batter</h2>
<ul><li>flour</li><li>beer &amp; salt</li></ul>
<pre>mix(flour,
    beer)</pre>
<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>
<h3></h3>
<div>Done<!-- a comment --></div>
<script src="x.js"></script>
</body></html>
"""


def test_html(tmp_path: Path) -> None:
    doc = read_one(write(tmp_path / "fish.html", PAGE))
    assert doc.title == "Fish & Chips"
    assert doc.kind == "html"
    assert doc.text == (
        "Home\n\n"
        "# Frying fish\n\n"
        "Heat the oil to 180\u00b0C \u2014 not more.\n\n"
        "Use a deep pan <here>.\nNew line in the same paragraph.\n\n"
        "## Batter\n\n"
        "flour\nbeer & salt\n\n"
        "```\nmix(flour,\n    beer)\n```\n\n"
        "a b\n1 2\n\n"
        "Done"
    )


def test_html_titles_and_sloppy_markup(tmp_path: Path) -> None:
    page = "<html><head><title></title><body><h2>Two</h2><h1>The <i>big</i>\n one</h1><p>x<br/>y<p>z"
    doc = read_one(write(tmp_path / "sloppy.htm", page))  # <head> never closed, <p> never closed
    assert (doc.title, doc.text) == ("The big one", "## Two\n\n# The big one\n\nx\ny\n\nz")
    doc = read_one(write(tmp_path / "bare.html", "just text, <svg><title>icon</title></svg>no tags"))
    assert (doc.title, doc.text) == ("bare", "just text, no tags")
    doc = read_one(write(tmp_path / "heading.html", "<h2>A<br>B <div>C</div></h2>after"))
    assert doc.text == "## A B C\n\nafter"  # a heading stays one line, so it stays a heading
    doc = read_one(write(tmp_path / "headless.html", "<title>T &amp; U</title><pre>\n  code\n</pre><p>a<script/>b"))
    assert (doc.title, doc.text) == ("T & U", "```\n  code\n```\n\nab")


def test_html_declared_charset(tmp_path: Path) -> None:
    page = '<html><head><meta charset="iso-8859-1"><title>Caf\u00e9</title></head><p>cr\u00e8me</p>'
    doc = read_one(write(tmp_path / "old.html", page.encode("latin-1")))
    assert (doc.title, doc.text) == ("Caf\u00e9", "cr\u00e8me")
    with pytest.raises(LmforgeError, match=r"undeclared\.html is not UTF-8 text \(byte 0xe8 at offset 5\)"):
        read_document(write(tmp_path / "undeclared.html", "<p>cr\u00e8me</p>".encode("latin-1")))


# pdf ---------------------------------------------------------------------------------------------------------------


def test_pdf(tmp_path: Path) -> None:
    path = write(tmp_path / "report.pdf", make_pdf(["Hello world", "Second page here"], title="Quarterly Report"))
    assert [p.extract_text() for p in pypdf.PdfReader(path).pages] == ["Hello world", "Second page here"]
    doc = read_one(path)
    assert doc == Document(str(path.resolve()), "Hello world\n\nSecond page here", "Quarterly Report", "pdf")
    assert read_one(write(tmp_path / "untitled.pdf", make_pdf(["One"]))).title == "untitled"


def _encrypted(user: str, owner: str) -> bytes:
    writer = pypdf.PdfWriter()
    writer.append(pypdf.PdfReader(io.BytesIO(make_pdf(["Locked text"]))))
    writer.encrypt(user, owner, algorithm="RC4-128")  # RC4 needs no optional crypto package
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_pdf_encrypted(tmp_path: Path) -> None:
    path = write(tmp_path / "secret.pdf", _encrypted("user-pw", "owner-pw"))
    with pytest.raises(LmforgeError) as e:
        read_document(path)
    assert str(e.value) == f"{path} is an encrypted PDF (it needs a password)"
    # an empty user password only restricts editing: the text is readable
    assert read_one(write(tmp_path / "open.pdf", _encrypted("", "owner-pw"))).text == "Locked text"


@pytest.mark.parametrize("data", [b"", b"%PDF-1.4\ngarbage", b"not a pdf at all", make_pdf(["x"])[:60]])
def test_pdf_unreadable(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path / "broken.pdf", data)
    with pytest.raises(LmforgeError, match=rf"^{path} is not a readable PDF: .+"):
        read_document(path)


# jsonl -------------------------------------------------------------------------------------------------------------


def test_jsonl_one_document_per_line(tmp_path: Path) -> None:
    lines = ['{"text": "first row", "title": "Row One"}', "", "  ", '{"text": "a\\r\\nb", "id": 7}',
             '{"text": "", "title": 5}']
    path = write(tmp_path / "rows.jsonl", "\n".join(lines) + "\n")
    base = str(path.resolve())
    assert read_document(path) == [
        Document(f"{base}#1", "first row", "Row One", "jsonl"),
        Document(f"{base}#4", "a\nb", "rows.jsonl line 4", "jsonl"),
        Document(f"{base}#5", "", "rows.jsonl line 5", "jsonl"),
    ]
    assert read_document(write(tmp_path / "empty.jsonl", "")) == []


@pytest.mark.parametrize(("bad", "message"), [
    ("{not json", r"line 3: not valid JSON"),
    ('["text"]', r"line 3: expected a JSON object, got a list"),
    ('{"title": "t"}', r'line 3: no "text" field'),
    ('{"text": 12}', r'line 3: "text" must be a string, got a number'),
    ('{"text": null}', r'line 3: "text" must be a string, got null'),
])
def test_jsonl_bad_line(tmp_path: Path, bad: str, message: str) -> None:
    path = write(tmp_path / "data.jsonl", '{"text": "ok"}\n\n' + bad + '\n{"text": "after"}\n')
    with pytest.raises(LmforgeError, match=rf"^{path} {message}"):
        read_document(path)


def test_jsonl_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "data.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(LmforgeError, match=r"data\.jsonl line 2 is not valid UTF-8"):
        read_document(path)


# hashing and the whole pipeline ------------------------------------------------------------------------------------


def test_content_hash(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # more than one read block
    path = write(tmp_path / "big.txt", data)
    assert content_hash(path) == hashlib.sha256(data).hexdigest()
    before = content_hash(path)
    write(path, data[:-1] + bytes([data[-1] ^ 1]))
    assert content_hash(path) != before
    with pytest.raises(LmforgeError, match="cannot read"):
        content_hash(tmp_path / "missing.txt")


def test_load_documents(tmp_path: Path) -> None:
    write(tmp_path / "a.md", "# A\n")
    write(tmp_path / "b.jsonl", '{"text": "one"}\n{"text": "two"}\n')
    write(tmp_path / "c.pdf", make_pdf(["Page"]))
    docs = load_documents([tmp_path])
    assert [(Path(d.path.split("#")[0]).name, d.kind, d.text) for d in docs] == [
        ("a.md", "md", "# A\n"), ("b.jsonl", "jsonl", "one"), ("b.jsonl", "jsonl", "two"), ("c.pdf", "pdf", "Page")]
