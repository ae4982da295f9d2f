# One virtualenv in the repo (.venv, git-ignored); pip's own cache (~/.cache/pip) makes
# re-installs cheap, so torch (several GB) is downloaded once per machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test crds check-crds

install: $(VENV)/.installed assets

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The bundled model and data under .data/pvc (git-ignored), where pvc:// URIs resolve for local
# runs (finetune_trainer/uris.py): MiniLM, the sentiment CSV (as UTF-8) and the digits ImageFolder.
.PHONY: assets
assets: $(VENV)/.installed
	$(PY) -m finetune_trainer.assets

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The CRD, the chart's copy and the README's API reference are generated from operator/finetune_operator/api.py.
crds: install
	$(PY) -m finetune_operator.generate

check-crds: install
	$(PY) -m finetune_operator.generate --check
