#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok and
# helm from their Go modules (Go module proxy only; no Docker, no downloads of release
# binaries) into a per-version cache outside the repo. Anything already cached is skipped.
#
#   deploy/local/build-binaries.sh                 build what is missing, print progress
#   deploy/local/build-binaries.sh --print-bin-dir print the cache's bin directory only
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$HERE/versions.env"
CACHE_ROOT=${FTO_K8S_CACHE:-$HOME/.cache/finetune-operator/k8s}
ROOT=$CACHE_ROOT/k8s-$K8S_VERSION.etcd-$ETCD_VERSION.kwok-$KWOK_VERSION.helm-$HELM_VERSION
BIN=$ROOT/bin

if [[ ${1:-} == --print-bin-dir ]]; then echo "$BIN"; exit 0; fi

mkdir -p "$BIN" "$ROOT/src"
export CGO_ENABLED=0   # static binaries, as k8s release builds are
START=$SECONDS
log() { printf '[k8s-binaries +%4ds] %s\n' $((SECONDS - START)) "$*"; }
have() { for b in "$@"; do [[ -x $BIN/$b ]] || return 1; done; }
need_go() {  # only a build needs Go; a cached run does not
  command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
  command -v go >/dev/null || { echo "build-binaries.sh: Go (go1.26+) must be on PATH to build" >&2; exit 1; }
}

build_kubernetes() {
  local tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  if have "${tools[@]}"; then log "kubernetes $K8S_VERSION: cached"; return; fi
  need_go
  log "kubernetes $K8S_VERSION: preparing wrapper module"
  local dir=$ROOT/src/kubernetes
  mkdir -p "$dir" && cd "$dir"
  [[ -f go.mod ]] || go mod init local/k8s-binaries >/dev/null 2>&1
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with
  # ./staging/...; a wrapper must replace each with its published v0.<minor>.<patch>.
  # The list comes from k8s's own go.mod so it follows new staging modules.
  local k8s_mod
  k8s_mod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  local staging_version=v0.${K8S_VERSION#v1.}
  local m
  for m in $(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$k8s_mod"); do
    go mod edit "-replace=$m=$m@$staging_version"
  done
  # Keep k8s's GODEBUG defaults; a main module on a newer go line would change them.
  local kv
  for kv in $(sed -n 's/^godebug \([^ (]*\)$/\1/p' "$k8s_mod"); do go mod edit "-godebug=$kv"; done
  local pkgs=()
  for m in "${tools[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$m"); done
  log "kubernetes $K8S_VERSION: resolving modules (go get)"
  go get "${pkgs[@]/%/@$K8S_VERSION}"
  # Without these, --version and /version say v0.0.0-master, which breaks helm's
  # kubeVersion checks and anything else that parses the server version.
  local v=${K8S_VERSION#v} ld="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=${v%%.*} -X $p.gitMinor=$(cut -d. -f2 <<<"$v")"
    ld+=" -X $p.gitCommit=release-$K8S_VERSION -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  log "kubernetes $K8S_VERSION: compiling ${tools[*]} (the long step)"
  go build -trimpath -ldflags "$ld" -o "$BIN/" "${pkgs[@]}"
  log "kubernetes $K8S_VERSION: done"
}

build_etcd() {
  if have etcd; then log "etcd $ETCD_VERSION: cached"; return; fi
  need_go
  # etcd's go.mod has replace directives, so `go install` refuses it; a wrapper
  # module works because replaces of dependencies are ignored.
  local dir=$ROOT/src/etcd
  mkdir -p "$dir" && cd "$dir"
  [[ -f go.mod ]] || go mod init local/etcd-binary >/dev/null 2>&1
  log "etcd $ETCD_VERSION: resolving modules"
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  log "etcd $ETCD_VERSION: compiling"
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
  log "etcd $ETCD_VERSION: done"
}

build_kwok() {
  # Its stages too: cluster.py cannot start kwok without them.
  if have kwok && [[ -d $ROOT/kwok-stages ]]; then log "kwok $KWOK_VERSION: cached"; return; fi
  need_go
  log "kwok $KWOK_VERSION: go install"
  GOBIN=$BIN go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  # kwok v0.8 has no built-in stages; keep the module's stage YAMLs next to the binary.
  local stages
  stages=$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage
  # Copied aside, then renamed: a copy cut short leaves no kwok-stages, so the next run copies again.
  rm -rf "$ROOT/kwok-stages" "$ROOT/kwok-stages.partial"
  cp -r "$stages" "$ROOT/kwok-stages.partial" && chmod -R u+w "$ROOT/kwok-stages.partial"
  mv "$ROOT/kwok-stages.partial" "$ROOT/kwok-stages"
  log "kwok $KWOK_VERSION: done"
}

build_helm() {
  if have helm; then log "helm $HELM_VERSION: cached"; return; fi
  need_go
  local k8s_minor
  k8s_minor=$(cut -d. -f2 <<<"${K8S_VERSION#v}")
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" p
  # helm template otherwise assumes Kubernetes 1.20 when not talking to a cluster.
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$k8s_minor"
  done
  log "helm $HELM_VERSION: go install"
  GOBIN=$BIN go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  log "helm $HELM_VERSION: done"
}

record_versions() {
  {
    local b
    for b in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
      echo "$b: $("$BIN/$b" --version 2>&1 | head -1)"
    done
    echo "kubectl: $("$BIN/kubectl" version --client 2>/dev/null | head -1)"
    echo "helm: $("$BIN/helm" version --short)"
  } >"$ROOT/versions.txt"
  log "versions recorded in $ROOT/versions.txt:"
  sed 's/^/    /' "$ROOT/versions.txt"
}

log "cache: $ROOT"
build_kubernetes
build_etcd
build_kwok
build_helm
record_versions
log "all binaries ready in $BIN"
