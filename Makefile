# napari-maesil: two commands for a fresh machine
#   make demo   install, pretrain the tiny preset (CT phantom, or DATA=...), write the
#               reconstruction figure (CT | masked | reconstruction | interpolation reference | error)
#   make test   install, run the whole test suite (a real napari viewer under Xvfb)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH ?= torch==2.13.0
DATA ?=
RUN ?= runs/demo
STEPS ?= 300
XVFB := $(shell command -v xvfb-run 2>/dev/null)

.PHONY: install demo test test-min lint format clean system-deps

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[testing]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/maesil pretrain $(if $(DATA),--data $(DATA),) --out $(RUN) --preset tiny --steps $(STEPS) --force
	$(VENV)/bin/maesil reconstruct --checkpoint $(RUN) --input $(if $(DATA),$(firstword $(DATA)),$(RUN)/phantom/phantom_00/ct.nii.gz) --out $(RUN)/reconstruction --force
	@echo "figure: $(RUN)/reconstruction/figure.png (the model's reconstruction beside the interpolation reference)"

# Debian packages napari needs to open a real (virtual) screen
system-deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb xauth libgl1-mesa-dri libegl1 \
	  libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
	  libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xinput0 libdbus-1-3

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(if $(XVFB),xvfb-run -a -s "-screen 0 1280x1024x24",) $(PY) -m pytest $(PYTEST_ARGS)

# the lower bounds of setup.cfg: .ci/min-versions.txt in a separate .venv-min, core tests (no GUI)
test-min:
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/pip install -q "$(TORCH)"
	.venv-min/bin/pip install -q -c .ci/min-versions.txt -e . pytest einops jsonschema fire pytorch-ignite
	.venv-min/bin/python -m pytest -q -p no:cacheprovider --ignore=tests/test_plugin.py \
	  --ignore=tests/readme_screenshots.py --ignore=tests/test_packaging.py $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .venv-min build dist src/*.egg-info .pytest_cache .ruff_cache
