# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# llama.cpp for the GGUF tests: a portable AVX2 build (see requirements-llamacpp.txt)
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

.PHONY: install weights demo test test-fast serve serve-train ui clean

$(STAMP): requirements.txt requirements-nodeps.txt requirements-llamacpp.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet --no-deps --no-cache-dir -r requirements-llamacpp.txt
	@# headless Chromium for the web page's tests (tests/test_webui.py); Playwright cannot download its own here
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "note: install Debian's chromium (apt-get install chromium) for the web page's browser tests"
	touch $(STAMP)

install: $(STAMP)

# The embedded base model (SmolLM2-135M-Instruct) as HF safetensors in weights/, once.
weights: $(STAMP)
	$(PY) scripts/prepare_base.py

# Train a LoRA adapter on the project's own demo data, then ask it a question.
demo: weights
	$(PY) train.py --train_data data/alpaca_demo.json --output_dir outputs/demo \
		--num_train_epochs 2 --learning_rate 2e-3 --train_batch_size 4 --gradient_accumulation_steps 1 \
		--val_set_size 4 --logging_steps 2
	COG_WEIGHTS=outputs/demo/adapter.tar.gz $(PY) predict.py --prompt "Tell me about alpacas." --temperature 0

test: $(STAMP)
	$(PY) -m pytest -q tests

# Cog's HTTP server (coglet) on this machine, without Docker; see docs/SERVING.md.
#   make serve PORT=5000 COG_WEIGHTS=outputs/demo/adapter.tar.gz    POST /predictions
#   make serve-train PORT=5001                                       POST /trainings
PORT ?= 5000
serve: $(STAMP)
	$(PY) scripts/serve.py --port $(PORT) $(if $(COG_WEIGHTS),--weights "$(COG_WEIGHTS)")

serve-train: $(STAMP)
	$(PY) scripts/serve.py --train --port $(PORT)

# The web page on http://127.0.0.1:$(UI_PORT): ask, compare, train, export (scripts/webui.py).
UI_PORT ?= 7860
ui: $(STAMP)
	$(PY) scripts/webui.py --port $(UI_PORT) $(if $(COG_WEIGHTS),--weights "$(COG_WEIGHTS)")

clean:
	rm -rf outputs .pytest_cache
