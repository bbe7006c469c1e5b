"""The OpenAI-compatible API in-process: every route, the wire format (JSON and server-sent events), every error
status, and that what it answers is exactly what the engine generates for the same prompt."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import randomized
from tiny import bert_folder, llama_folder

from lmforge.embeddings import embed_ids
from lmforge.generate import SamplingParams, complete
from lmforge.serve import ServeOptions, build
from lmforge.weights.load import load

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model, tokenizer = load(llama_folder(root / "llama", layers=2, chat_template=True), dtype="float32")
    randomized(model, seed=1, scale=0.1)  # distinct logits: greedy answers do not hinge on float noise
    encoder, enc_tokenizer = load(bert_folder(root / "bert"), dtype="float32")
    return model, tokenizer, encoder, enc_tokenizer, root


def make_client(models, **options) -> TestClient:
    model, tokenizer, encoder, enc_tokenizer, root = models
    options = {"name": "tiny", "embed_name": "enc", "feedback": root / "feedback.jsonl", **options}
    return TestClient(build(model, tokenizer, ServeOptions(**options), encoder, enc_tokenizer))


@pytest.fixture(scope="module")
def client(models):
    with make_client(models) as c:
        yield c


def chat_ids(tokenizer, messages) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def engine_text(models, ids: list[int], **params) -> tuple[str, str, int]:
    model, tokenizer = models[0], models[1]
    (c,) = complete(model, tokenizer, [ids], SamplingParams(**params))
    return c.text, {"eos": "stop"}.get(c.finish_reason, c.finish_reason), c.usage.completion_tokens


def events(response) -> list[dict | str]:
    """The data of each server-sent event ('[DONE]' as a string)."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def error_of(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    return error


# ---- answers are the engine's ------------------------------------------------------------------------------


def test_models_lists_the_chat_and_embedding_models(client):
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["kind"], m["context_length"]) for m in data] == [("tiny", "chat", 64), ("enc", "embedding", 32)]
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    error_of(client.get("/v1/models/nope"), 404)


def test_chat_completion_is_the_engines_greedy_answer(client, models):
    body = {"model": "tiny", "messages": HI, "max_tokens": 12, "temperature": 0}
    got = client.post("/v1/chat/completions", json=body).json()
    ids = chat_ids(models[1], HI)
    text, reason, n = engine_text(models, ids, max_new_tokens=12, temperature=0)
    assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-")
    assert got["choices"] == [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                               "finish_reason": reason}]
    assert got["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}


def test_streamed_chunks_add_up_to_the_same_answer(client, models):
    body = {"model": "tiny", "messages": HI, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = events(r)
    assert data[-1] == "[DONE]"
    chunks, usage = data[:-2], data[-2]
    assert all(c["object"] == "chat.completion.chunk" and len({c["id"] for c in chunks}) == 1 for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    text, reason, n = engine_text(models, chat_ids(models[1], HI), max_new_tokens=12, temperature=0)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == reason
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == n
    assert all(c["usage"] is None for c in chunks)


def test_text_completion_of_text_token_ids_and_several_prompts_with_n(client, models):
    tokenizer = models[1]
    ids = tokenizer.encode("hello")
    text, _, _ = engine_text(models, ids, max_new_tokens=6, temperature=0)
    for prompt in ("hello", ids):
        got = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 6,
                                                   "temperature": 0}).json()
        assert got["object"] == "text_completion" and got["choices"][0]["text"] == text
    other = tokenizer.encode("abc")
    got = client.post("/v1/completions", json={"model": "tiny", "prompt": ["hello", "abc"], "n": 2,
                                               "max_tokens": 6, "temperature": 0}).json()
    other_text, _, _ = engine_text(models, other, max_new_tokens=6, temperature=0)
    assert [(c["index"], c["text"]) for c in got["choices"]] == [(0, text), (1, text), (2, other_text),
                                                                   (3, other_text)]
    assert got["usage"]["prompt_tokens"] == len(ids) + len(other)
    echo = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 6, "echo": True,
                                                "temperature": 0}).json()
    assert echo["choices"][0]["text"] == "hello" + text


def test_seed_makes_sampling_reproducible_and_choices_differ(client):
    body = {"model": "tiny", "messages": HI, "max_tokens": 16, "temperature": 1.0, "seed": 1234, "n": 2}
    a = client.post("/v1/chat/completions", json=body).json()["choices"]
    b = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert [c["message"] for c in a] == [c["message"] for c in b]
    assert a[0]["message"] != a[1]["message"]  # each choice its own seed


def test_logprobs_are_the_models_own(client, models):
    import torch

    model, tokenizer = models[0], models[1]
    body = {"model": "tiny", "messages": HI, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    ids = chat_ids(tokenizer, HI)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1]
    logp = torch.log_softmax(logits.float(), -1)
    first = content[0]
    assert first["token"] == tokenizer.decode([int(logp.argmax())], skip_special_tokens=False)
    assert first["logprob"] == pytest.approx(float(logp.max()), abs=1e-4)
    assert [t["logprob"] for t in first["top_logprobs"]] == pytest.approx(logp.topk(3).values.tolist(), abs=1e-4)
    assert len(content) == 4
    got = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3,
                                               "temperature": 0, "logprobs": 2}).json()["choices"][0]["logprobs"]
    assert len(got["tokens"]) == len(got["token_logprobs"]) == len(got["top_logprobs"]) == 3
    assert got["text_offset"][0] == 0 and all(len(t) == 2 for t in got["top_logprobs"])


def test_stop_strings_and_ignore_eos(client, models):
    tokenizer = models[1]
    full, _, _ = engine_text(models, chat_ids(tokenizer, HI), max_new_tokens=12, temperature=0)
    stop = full[3:5]
    got = client.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 12,
                                                    "temperature": 0, "stop": stop}).json()["choices"][0]
    assert got["finish_reason"] == "stop" and got["message"]["content"] == full[: full.index(stop)]
    got = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 30,
                                               "temperature": 0, "ignore_eos": True}).json()
    assert got["choices"][0]["finish_reason"] == "length" and got["usage"]["completion_tokens"] == 30


# ---- embeddings and feedback -------------------------------------------------------------------------------


def test_embeddings_match_the_library_as_floats_and_base64(client, models):
    encoder, enc_tokenizer = models[2], models[3]
    texts = ["the cat sat", "a dog"]
    got = client.post("/v1/embeddings", json={"model": "enc", "input": texts}).json()
    ids = enc_tokenizer.encode_batch(texts)
    want = embed_ids(encoder, ids, pad_id=enc_tokenizer.pad_id)
    assert [d["index"] for d in got["data"]] == [0, 1]
    np.testing.assert_allclose(np.array([d["embedding"] for d in got["data"]]), want, atol=1e-6)
    assert got["usage"]["prompt_tokens"] == sum(map(len, ids))
    b64 = client.post("/v1/embeddings", json={"model": "enc", "input": "a dog", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, want[1], atol=1e-6)
    by_ids = client.post("/v1/embeddings", json={"model": "enc", "input": ids[1]}).json()
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], want[1], atol=1e-6)
    error_of(client.post("/v1/embeddings", json={"model": "enc", "input": []}), 400, "input")
    error_of(client.post("/v1/embeddings", json={"model": "enc", "input": "x", "dimensions": 7}), 400, "dimensions")
    error_of(client.post("/v1/embeddings", json={"model": "tiny", "input": "x"}), 404, "model")


def test_feedback_is_appended_as_jsonl(client, models):
    path = models[4] / "feedback.jsonl"
    path.unlink(missing_ok=True)
    for rating in (1, -1):
        got = client.post("/v1/feedback", json={"messages": HI, "response": f"answer {rating}", "rating": rating})
        assert got.json() == {"saved": True}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["messages"], r["response"], r["rating"]) for r in rows] == [(HI, "answer 1", 1), (HI, "answer -1", -1)]
    error_of(client.post("/v1/feedback", json={"messages": HI, "response": "x", "rating": 0}), 422)


# ---- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"), ({"n": 99}, "n"),
    ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 50}, "logprobs"),
    ({"max_tokens": 60}, "max_tokens"), ({"messages": []}, "messages"),
])
def test_bad_parameters_are_400_naming_the_parameter(client, extra, param):
    error_of(client.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, **extra}), 400, param)


def test_context_overflow_is_400_with_its_code(client):
    long = [{"role": "user", "content": "x" * 80}]
    error = error_of(client.post("/v1/chat/completions", json={"model": "tiny", "messages": long}), 400)
    assert error["code"] == "context_length_exceeded" and "context" in error["message"]
    error_of(client.post("/v1/completions", json={"model": "tiny", "prompt": [300]}), 400, "prompt")


def test_unknown_model_is_404(client):
    error = error_of(client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": HI}), 404, "model")
    assert error["code"] == "model_not_found" and "tiny" in error["message"]


def test_malformed_bodies_are_422_and_oversized_413(models):
    with make_client(models, max_body=2000) as c:
        headers = {"content-type": "application/json"}
        assert error_of(c.post("/v1/chat/completions", content=b"{not json", headers=headers), 422)["message"] == (
            "the body is not valid JSON")
        error_of(c.post("/v1/chat/completions", json={"model": "tiny"}), 422, "messages")
        error_of(c.post("/v1/chat/completions", json={"model": "tiny", "messages": "hi"}), 422, "messages")
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
        assert error_of(c.post("/v1/chat/completions", json=big), 413)["code"] == "body_too_large"

        def chunks():  # no Content-Length: the limit still holds
            yield json.dumps(big).encode()

        error_of(c.post("/v1/chat/completions", content=chunks(), headers=headers), 413)


def test_api_key_is_enforced_on_the_api_but_not_the_page(models):
    with make_client(models, api_keys=["sk-right"]) as c:
        body = {"model": "tiny", "messages": HI, "max_tokens": 2}
        assert error_of(c.post("/v1/chat/completions", json=body), 401)["code"] == "invalid_api_key"
        error_of(c.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}), 401)
        right = {"Authorization": "Bearer sk-right"}
        assert c.post("/v1/chat/completions", json=body, headers=right).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "sk-right"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


def test_no_embedding_model_and_no_feedback_file_are_clear_errors(models):
    model, tokenizer = models[0], models[1]
    with TestClient(build(model, tokenizer, ServeOptions(name="tiny"))) as c:
        assert "embedding model" in error_of(c.post("/v1/embeddings", json={"model": "e", "input": "x"}), 404)[
            "message"]
        assert "feedback" in error_of(c.post("/v1/feedback", json={"messages": HI, "response": "x", "rating": 1}),
                                      400)["message"]
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]


# ---- RAG mode ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rag_client(models, tmp_path_factory):
    from lmforge.rag.index import index_paths
    from lmforge.rag.store import open_store

    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs"
    docs.mkdir()
    (docs / "festival.md").write_text("# The Zorblax festival\n\nThe Zorblax festival is held every March in "
                                      "Quibbleton.\n")
    (docs / "garden.md").write_text("# Tomatoes\n\nTomatoes need full sun and regular watering.\n")
    store = open_store(root / "store.db")
    index_paths([docs], store)
    store.close()
    model, tokenizer = load(llama_folder(root / "llama", layers=2, chat_template=True, context=1024), dtype="float32")
    randomized(model, seed=1, scale=0.1)  # a context with room for the sources
    rag_models = (model, tokenizer, *models[2:])
    with make_client(rag_models, rag_store=str(root / "store.db")) as c:
        yield c, rag_models


def test_rag_requests_answer_from_the_store_with_citations(rag_client):
    from lmforge.rag.answer import conversation_with_sources, retrieve_sources

    rag_client, models = rag_client
    served = rag_client.app.state.served
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "When is the Zorblax festival?"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, "rag": {"k": 2}}
    got = rag_client.post("/v1/chat/completions", json=body).json()
    assert [c["n"] for c in got["citations"]] == [1, 2]
    assert got["citations"][0]["source"].endswith("festival.md") and "Quibbleton" in got["citations"][0]["text"]
    hits = retrieve_sources(messages[-1]["content"], served.store, 2)
    turns = conversation_with_sources(messages, hits)
    assert turns[0]["content"].startswith("Be brief.") and "[1] The Zorblax festival" in turns[-1]["content"]
    text, _, _ = engine_text(models, chat_ids(models[1], turns), max_new_tokens=8, temperature=0)
    assert got["choices"][0]["message"]["content"] == text  # the model saw exactly the sources
    with rag_client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        data = events(r)
    assert [c["n"] for c in data[0]["citations"]] == [1, 2] and "citations" in data[-2]
    assert rag_client.get("/health").json()["rag"] is True


def test_rag_with_nothing_relevant_says_so_and_without_a_store_is_400(rag_client, client):
    rag_client, _ = rag_client
    body = {"model": "tiny", "messages": [{"role": "user", "content": "airspeed of an unladen swallow"}],
            "rag": {"min_score": 0.9}}
    got = rag_client.post("/v1/chat/completions", json=body).json()
    assert got["choices"][0]["message"]["content"].startswith("I could not find") and got["citations"] == []
    assert "no document store" in error_of(client.post("/v1/chat/completions", json={**body, "rag": True}), 400,
                                           "rag")["message"]
    error_of(rag_client.post("/v1/chat/completions", json={**body, "rag": {"k": 0}}), 400, "rag")
