# Break-glass administration of pkisvc's store: cluster "prod", KV v2 mount "secret", prefix
# "pkisvc" (`setup.sh render admin` rewrites them).  Not for the service: it may rewrite and
# delete history.  Keep it on a token created only when needed, short-lived and audited
# (`bao token create -policy=pkisvc-prod-admin -ttl=1h -use-limit=…`).  What it is for:
# repairing a store by hand (a leftover `material-*` no record names, a restore), rotating
# the service's AppRole secret IDs, and re-applying pkisvc's policies.

path "secret/data/pkisvc/prod/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
path "secret/metadata/pkisvc/prod/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
path "secret/delete/pkisvc/prod/*" {
  capabilities = ["update"]
}
path "secret/undelete/pkisvc/prod/*" {
  capabilities = ["update"]
}
path "secret/destroy/pkisvc/prod/*" {
  capabilities = ["update"]
}

# pkisvc's policies and its AppRole role (secret IDs, TTLs, CIDR bindings).
path "sys/policies/acl/pkisvc-prod" {
  capabilities = ["create", "read", "update"]
}
path "sys/policies/acl/pkisvc-prod-*" {
  capabilities = ["create", "read", "update"]
}
path "auth/approle/role/pkisvc-prod" {
  capabilities = ["create", "read", "update"]
}
path "auth/approle/role/pkisvc-prod/*" {
  capabilities = ["create", "read", "update", "list"]
}
