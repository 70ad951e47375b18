#!/usr/bin/env bash
# pkisvc's setup in Vault or OpenBao, done once by an administrator (README, "The Vault /
# OpenBao backend").  The three policies beside this script are written for cluster "prod",
# mount "secret", prefix "pkisvc"; this script renders them for yours.
#
#   CLUSTER=prod docs/vault/setup.sh render service|auditor|admin   # print one policy
#   CLUSTER=prod docs/vault/setup.sh apply                          # mount, policies, AppRole
#   CLUSTER=prod docs/vault/setup.sh secret-id FILE                 # a new secret ID, 0600
#
# Environment: CLUSTER (required), MOUNT (secret), PREFIX (pkisvc): pkisvc's `cluster`,
# `vault.mount`, `vault.prefix`.  BAO: the command line (bao; `vault` for HashiCorp Vault;
# `docker compose exec -T openbao bao` works too),
# which reads BAO_ADDR/VAULT_ADDR and BAO_TOKEN/VAULT_TOKEN as usual.  For `apply`:
# CIDRS (comma-separated) binds secret IDs and their tokens to the service's addresses;
# TOKEN_TTL (1h), TOKEN_MAX_TTL (24h), SECRET_ID_TTL (2160h = 90 days).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
read -ra bao <<<"${BAO:-bao}"  # a command and its words, e.g. "docker compose exec -T openbao bao"
MOUNT="${MOUNT:-secret}"
PREFIX="${PREFIX:-pkisvc}"
CLUSTER="${CLUSTER:-}"
case "${1:-}" in render|apply|secret-id) ;; *) sed -n '2,15p' "$0" >&2; exit 2 ;; esac
name_re='^[A-Za-z0-9._-]+$'
for v in CLUSTER MOUNT PREFIX; do
    if ! [[ "${!v}" =~ $name_re ]] || [[ "${!v}" == *..* ]]; then
        echo "setup.sh: $v must be a plain name (letters, digits, '.', '_', '-')" >&2
        exit 2
    fi
done
role="pkisvc-$CLUSTER"

render() {  # render service|auditor|admin: the policy for this cluster, mount and prefix
    local file="$here/pkisvc-$1.hcl"
    [ -f "$file" ] || { echo "setup.sh: no policy named $1 (service, auditor, admin)" >&2; exit 2; }
    echo "# pkisvc-$1.hcl rendered for cluster $CLUSTER, mount $MOUNT, prefix $PREFIX"
    sed -E -e "/^path \"/ s#^path \"secret/([a-z]+)/pkisvc/prod#path \"$MOUNT/\\1/$PREFIX/$CLUSTER#" \
           -e "/^path \"/ s#pkisvc-prod#$role#g" "$file"
}

apply() {
    # The KV v2 mount (an existing one is checked, never changed).
    local mounts
    mounts="$("${bao[@]}" secrets list -format=json)"
    if ! grep -q "\"$MOUNT/\"" <<<"$mounts"; then
        "${bao[@]}" secrets enable -path="$MOUNT" kv-v2 >/dev/null
        echo "enabled KV v2 at $MOUNT/"
    fi
    local config
    config="$("${bao[@]}" read -format=json "$MOUNT/config")"
    if grep -Eq '"delete_version_after": *"[1-9]' <<<"$config"; then
        echo "setup.sh: $MOUNT has delete_version_after set: it would delete pkisvc's history;" \
             "give pkisvc a mount without it" >&2
        exit 1
    fi
    # The policies: pkisvc-CLUSTER (the service), -auditor, -admin (break-glass).
    local kind
    for kind in service auditor admin; do
        local name="$role-$kind"
        [ "$kind" = service ] && name="$role"
        render "$kind" | "${bao[@]}" policy write "$name" - >/dev/null
        echo "policy $name written"
    done
    # AppRole: reusable secret IDs (every worker, CLI run and restart logs in), bound to CIDRS.
    if ! "${bao[@]}" auth list -format=json | grep -q '"approle/"'; then
        "${bao[@]}" auth enable approle >/dev/null
        echo "enabled AppRole at approle/"
    fi
    local bind=()
    if [ -n "${CIDRS:-}" ]; then
        bind=("secret_id_bound_cidrs=$CIDRS" "token_bound_cidrs=$CIDRS")
    fi
    "${bao[@]}" write "auth/approle/role/$role" token_policies="$role" \
        token_ttl="${TOKEN_TTL:-1h}" token_max_ttl="${TOKEN_MAX_TTL:-24h}" \
        secret_id_ttl="${SECRET_ID_TTL:-2160h}" secret_id_num_uses=0 \
        token_type=service "${bind[@]}" >/dev/null
    echo "AppRole role $role written"
    echo "role_id: $("${bao[@]}" read -field=role_id "auth/approle/role/$role/role-id")"
    if [ "$("${bao[@]}" audit list -format=json 2>/dev/null || echo '{}')" = "{}" ]; then
        echo "setup.sh: no audit device is enabled: declare one in the server's" \
             "configuration (OpenBao 2.x) or run \`vault audit enable file …\` (Vault)" >&2
    fi
}

secret_id() {  # secret-id FILE: a new secret ID for the role, written 0600 (never printed)
    local file="$1"
    (umask 077 && "${bao[@]}" write -f -field=secret_id "auth/approle/role/$role/secret-id" \
        > "$file.tmp")
    mv "$file.tmp" "$file"
    echo "secret ID written to $file"
}

case "${1:-}" in
    render) render "${2:-}" ;;
    apply) apply ;;
    secret-id) secret_id "${2:?usage: setup.sh secret-id FILE}" ;;
esac
