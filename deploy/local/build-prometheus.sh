#!/usr/bin/env bash
# Build Prometheus and promtool from their Go module (Go module proxy only) into a per-version cache
# outside the repo, for the chart's tests. Debian's `prometheus` package would be simpler, but Debian
# removed Kubernetes service discovery from it (its NEWS.Debian, 1.5.0) and the tests discover trainer
# pods through the apiserver. Only that discovery is compiled in (Prometheus's build tags), which
# keeps the build to a few minutes.
#
#   deploy/local/build-prometheus.sh                 build if missing, print progress
#   deploy/local/build-prometheus.sh --print-bin-dir print the cache's bin directory only
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$HERE/versions.env"
BIN=${FTO_PROMETHEUS_CACHE:-$HOME/.cache/finetune-operator/prometheus}/prometheus-$PROMETHEUS_VERSION/bin

if [[ ${1:-} == --print-bin-dir ]]; then echo "$BIN"; exit 0; fi
if [[ -x $BIN/prometheus && -x $BIN/promtool ]]; then echo "prometheus $PROMETHEUS_VERSION: cached in $BIN"; exit 0; fi

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "build-prometheus.sh: Go (go1.26+) must be on PATH to build" >&2; exit 1; }
mkdir -p "$BIN"
START=$SECONDS
echo "prometheus $PROMETHEUS_VERSION: go install (kubernetes discovery only)"
CGO_ENABLED=0 GOBIN=$BIN go install -trimpath -tags remove_all_sd,enable_kubernetes_sd -ldflags "-s -w" \
  "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION" \
  "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
echo "prometheus $PROMETHEUS_VERSION: done in $((SECONDS - START)) s: $("$BIN/prometheus" --version 2>&1 | head -1)"
