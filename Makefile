# make demo: set up .venv, train tiny ChuXin on the built-in corpus, generate from it.
# make test: set up .venv with the dev requirements, run the test suite.
# make serve: the web app (apps/web) on http://127.0.0.1:8000 with the tiny demo models (trained where missing).
VENV ?= .venv
PY := $(VENV)/bin/python
RUN := output/chuxin_tiny

.PHONY: demo test bench serve clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

output/tokenizer/tokenizer.json: | $(VENV)/.runtime
	$(PY) tools/train_tokenizer.py --out $@

demo: $(VENV)/.runtime output/tokenizer/tokenizer.json
	$(PY) tools/train.py -c configs/chuxin/tiny.yaml --resume auto
	$(PY) tools/infer.py --ckpt $(RUN) --prompts configs/chuxin/prompts.txt --max-new-tokens 48

test: $(VENV)/.dev
	$(PY) -m pytest -q tests

bench: $(VENV)/.dev output/tokenizer/tokenizer.json
	$(PY) benchmarks/bench_train.py

serve: $(VENV)/.runtime output/tokenizer/tokenizer.json
	$(PY) apps/web/serve.py --demo $(if $(PORT),--port $(PORT))

clean:
	rm -rf output
