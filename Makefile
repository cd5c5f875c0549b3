# The two commands of the README: `make demo` (main job, offline) and `make test`.
# Each creates the virtual environment from requirements.txt on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist
ARGS ?=

.PHONY: demo test install data clean

$(VENV)/.installed: requirements.txt setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Debian's dataset-fashion-mnist package: the offline data of the CPU preset.
data:
	@if [ -d $(FASHION_MNIST) ]; then echo "Fashion-MNIST found in $(FASHION_MNIST)"; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist || \
	  ( $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist ); \
	else echo "no apt-get: put the Fashion-MNIST IDX files in a folder and pass --data_dir=<folder>"; fi

demo: install data
	$(PY) experiments/early_phase_study.py $(ARGS)

test: install
	$(PY) -m pytest tests $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
