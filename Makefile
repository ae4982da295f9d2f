# One virtualenv in the repo (.venv, git-ignored); pip's own cache (~/.cache/pip) makes
# re-installs cheap, so torch (several GB) is downloaded once per machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test crds check-crds pins

install: $(VENV)/.installed assets

# The trainer's stack is pinned (trainer/constraints.txt, the trainer image's too), so the tests run
# on what the image runs; `make pins` rewrites the pins from the installed environment. A venv whose creation
# failed (no python3-venv: ensurepip) has a python and no pip: it is made again, not kept.
$(VENV)/.installed: pyproject.toml trainer/constraints.txt
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && python3 -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c trainer/constraints.txt -e '.[dev]'
	touch $@

# The bundled model and data under .data/pvc (git-ignored), where pvc:// URIs resolve for local
# runs (finetune_trainer/uris.py): MiniLM, the sentiment CSV (as UTF-8) and the digits ImageFolder.
.PHONY: assets
assets: $(VENV)/.installed
	$(PY) -m finetune_trainer.assets

# The main job on this machine: the local control plane, the operator and a real trainer pod running
# MiniLM + LoRA on the sentiment corpus, on the CPU (deploy/local/demo.py). It leaves the cluster up.
.PHONY: demo demo-trainer
demo: install k8s-binaries
	$(PY) deploy/local/demo.py

# The same job without a cluster: the trainer alone.
demo-trainer: install
	$(VENV)/bin/finetune-trainer run deploy/examples/minilm-sentiment.yaml --output out/minilm-sentiment

test: install k8s-binaries prometheus
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Generated files: the CRD, the chart's copy and the README's API reference (from operator/finetune_operator/api.py),
# the chart's RBAC rules (rbac.py) and the Grafana dashboard, both copies (dashboard.py).
crds: install
	$(PY) -m finetune_operator.generate

check-crds: install
	$(PY) -m finetune_operator.generate --check

pins: install
	$(PY) trainer/pins.py

# The plain manifests (deploy/manifests/) rendered from the chart with helm, for users without Helm.
.PHONY: manifests check-manifests
HELM = $$(deploy/local/build-binaries.sh --print-bin-dir)/helm

manifests: install k8s-binaries
	$(PY) deploy/manifests/render.py --helm $(HELM)

check-manifests: install k8s-binaries
	$(PY) deploy/manifests/render.py --helm $(HELM) --check

# A real Prometheus (and promtool) for the chart's tests, built from its Go module with Kubernetes
# discovery (deploy/local/build-prometheus.sh; cached under ~/.cache/finetune-operator/prometheus).
.PHONY: prometheus
prometheus:
	deploy/local/build-prometheus.sh

# The local control plane (deploy/local): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok and helm built from Go modules and cached under
# ~/.cache/finetune-operator/k8s (tens of minutes the first time, seconds after).
.PHONY: k8s-binaries cluster-up cluster-down

k8s-binaries:
	deploy/local/build-binaries.sh

cluster-up: install k8s-binaries
	$(PY) deploy/local/cluster.py up

# It stops make demo's operator too: recorded in .cluster/pids/ beside the components, as every PID `down` stops.
cluster-down:
	$(PY) deploy/local/cluster.py down

# Benchmarks (bench/README.md): not tests; each writes bench/results/<name>.{md,json}. They take
# tens of minutes on a 2-core machine; bench-gpu needs an NVIDIA GPU (elsewhere it says so and exits 0).
.PHONY: bench bench-gpu

bench: install
	$(PY) -m bench.accuracy
	$(PY) -m bench.throughput
	$(PY) -m bench.pruning

bench-gpu: install
	$(PY) -m bench.gpu
	$(PY) -m bench.gpu_pipeline
