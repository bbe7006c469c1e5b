"""lmforge as a client of a remote OpenAI-compatible server (our own, in these tests): the library client, and
generate/chat with --api-base giving exactly what the server's model generates."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers import randomized, running_server
from tiny import bert_folder, llama_folder

from lmforge.chat import chat_session
from lmforge.cli import main
from lmforge.client import Client, api_base
from lmforge.embeddings import embed_ids
from lmforge.errors import LmforgeError
from lmforge.generate import SamplingParams, complete
from lmforge.serve import ServeOptions, build
from lmforge.weights.load import load

GREEDY = SamplingParams(max_new_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    model, tokenizer = load(llama_folder(root / "llama", layers=2, chat_template=True, context=256), dtype="float32")
    randomized(model, seed=4, scale=0.1)
    encoder, enc_tokenizer = load(bert_folder(root / "bert"), dtype="float32")
    options = ServeOptions(name="tiny", embed_name="enc", api_keys=["sk-c"])
    with running_server(build(model, tokenizer, options, encoder, enc_tokenizer)) as url:
        yield url, model, tokenizer, encoder, enc_tokenizer


def local_chat(server, messages) -> str:
    _, model, tokenizer, _, _ = server
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    return complete(model, tokenizer, [ids], GREEDY)[0].text


def test_api_base_spellings():
    assert {api_base(u) for u in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/")} == {"http://h:1/v1"}
    with pytest.raises(LmforgeError, match="http"):
        api_base("localhost:8000")


def test_client_streams_the_servers_answers_and_embeddings(server):
    url, model, tokenizer, encoder, enc_tokenizer = server
    client = Client(url, "sk-c")
    assert client.model == "tiny"  # the server's first chat model
    messages = [{"role": "user", "content": "hi there"}]
    deltas = list(client.stream_chat(messages, GREEDY))
    assert "".join(d.text for d in deltas) == local_chat(server, messages)
    last = deltas[-1]
    assert last.finish_reason in ("stop", "length") and last.usage is not None and last.usage.completion_tokens >= 1
    want = complete(model, tokenizer, [tokenizer.encode("abc")], GREEDY)[0].text
    assert "".join(d.text for d in client.stream_text("abc", GREEDY)) == want
    vectors = client.embed(["one two", "three"], "enc")
    np.testing.assert_allclose(vectors, embed_ids(encoder, enc_tokenizer.encode_batch(["one two", "three"]),
                                                  pad_id=enc_tokenizer.pad_id), atol=1e-6)


def test_client_errors_are_one_line(server):
    url = server[0]
    with pytest.raises(LmforgeError, match="401: wrong API key"):
        Client(url, "sk-wrong").models()
    with pytest.raises(LmforgeError, match="404: model 'nope'"):
        list(Client(url, "sk-c", model="nope").stream_chat([{"role": "user", "content": "x"}], GREEDY))
    with pytest.raises(LmforgeError, match="cannot reach"):
        Client("http://127.0.0.1:9", timeout=2).models()


def test_generate_and_chat_with_api_base(server, capsys):
    url = server[0]
    args = ["--api-base", url, "--api-key", "sk-c", "--temperature", "0", "--max-new-tokens", "10"]
    assert main(["generate", "hi there", "--chat", *args]) == 0
    assert capsys.readouterr().out == local_chat(server, [{"role": "user", "content": "hi there"}]) + "\n"
    assert main(["generate", "hi there", "--chat", "--format", "json", *args]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["text"] == local_chat(server, [{"role": "user", "content": "hi there"}])
    assert got["usage"]["completion_tokens"] >= 1
    assert main(["generate", "hi", "--dtype", "int4", *args]) == 2
    assert "--dtype is for a local model" in capsys.readouterr().err

    out = io.StringIO()
    messages = chat_session(None, None, GREEDY, system="be brief", stdin=io.StringIO("hello\nagain\n"), stdout=out,
                            remote=Client(url, "sk-c"))
    first = local_chat(server, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    assert messages[:3] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                            {"role": "assistant", "content": first}]
    assert messages[4]["content"] == local_chat(server, messages[:4])  # the second turn saw the whole history
    assert out.getvalue().startswith(first + "\n")
