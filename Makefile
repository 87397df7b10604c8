# One virtual environment (.venv) with the pinned versions of constraints.txt; every target installs it first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install test test-slow test-gpu demo fashion-mnist browser scaling-plots tokens throughput lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: install browser
	$(PY) -m pytest -q -n auto --dist worksteal

test-slow: install
	$(PY) -m pytest -q -m slow -n auto --dist worksteal

# The CUDA checks (tests/test_gpu.py); -rs lists every skip with its reason (no CUDA, one GPU, no flash-attn).
test-gpu: install
	$(PY) -m pytest -q -m gpu -rs

# Debian ships the real Fashion-MNIST idx files; install them when we can (root or sudo), else use dataset.root.
fashion-mnist:
	@if [ -f $(FMNIST) ]; then echo "Fashion-MNIST: $(FMNIST)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	elif command -v sudo >/dev/null; then sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	else echo "Fashion-MNIST not found: install Debian's dataset-fashion-mnist or pass dataset.root=DIR"; fi

# Headless Chromium and its driver for the HTML report's browser test (tests/test_report.py skips it without them);
# installed when we can (root or sudo without a password); never fails: the rest of the suite runs without it.
BROWSER_PKGS := chromium chromium-driver
BROWSER_MISS := echo "browser: could not install $(BROWSER_PKGS); the browser test of tests/test_report.py is skipped"
browser:
	-@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	  echo "browser: $$(command -v chromium)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q $(BROWSER_PKGS) || (apt-get update -q && apt-get install -y -q $(BROWSER_PKGS))) \
	    >/dev/null 2>&1 || $(BROWSER_MISS); \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	  sudo -n apt-get install -y -q $(BROWSER_PKGS) >/dev/null 2>&1 || $(BROWSER_MISS); \
	else $(BROWSER_MISS); fi

demo: install fashion-mnist
	$(PY) -m bench.demo

scaling-plots: install
	$(PY) -m bench.plots

tokens: install
	$(PY) -m bench.tokens

# Training and sampling img/s, utilisation and peak memory of every backbone (S presets, 32x32x4, batch 32, fp32)
throughput: install
	$(PY) -m bench.throughput

lint: install
	.venv/bin/ruff check .

clean:
	rm -rf outputs multirun runs .pytest_cache
