#!/usr/bin/env bash
# Debian packages the tests judge certificates with: etcd (server + etcdctl) and a kubectl;
# Chromium and its driver for the operator pages' browser tests; easy-rsa for adoption.
set -euo pipefail
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)   # promtool checks our alert rules
command -v wrk >/dev/null 2>&1 || need+=(wrk)                # make bench drives load with it
command -v curl >/dev/null 2>&1 || need+=(curl)  # carries refused client pairs to etcd
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # the operator pages' browser tests
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)  # selenium drives it
[ -x /usr/sbin/update-ca-certificates ] || need+=(ca-certificates)  # doctor's host trees
# Clusters made the old way (kube-up's make-ca-cert.sh), for the adoption tests; Debian's
# program is /usr/share/easy-rsa/easyrsa, not on PATH.
[ -x /usr/share/easy-rsa/easyrsa ] || need+=(easy-rsa)
# A fixed kubectl build: the image's pinned kubectl.1.NN beside its version dispatcher, or
# Debian's kubernetes-client where there is no kubectl at all (see FIELD-NOTES).  Never both:
# the image's `kubectl` package owns /usr/bin/kubectl, which kubernetes-client also ships.
# kubernetes-client is 1.20 on Go 1.19: the tests then ask SelfSubjectReview through
# `kubectl create --raw` and skip the one Go>=1.23 fact (negative serials); set KUBECTL=PATH
# to judge with another build.
command -v kubectl >/dev/null 2>&1 || need+=(kubernetes-client)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: missing ${need[*]} and not root; tests that need them will fail" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
