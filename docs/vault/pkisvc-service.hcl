# pkisvc's own policy (the service, its workers, the CLI): cluster "prod", KV v2 mount
# "secret", prefix "pkisvc".  `setup.sh render service` rewrites those three for yours.
# It holds what the code needs and nothing more: every secret of history is created once and
# never changed, no metadata can be written or deleted (so no `max_versions`, no purge), and
# nothing can be deleted.  The test suite runs every Vault test with exactly this policy.

# A version: its private keys first, then its record (certificates, fingerprints and the
# change's event) created with cas=0 — the commit point.  `create` without `update`: a
# written version can never be rewritten.
path "secret/data/pkisvc/prod/versions/+/material-*" {
  capabilities = ["create", "read"]
}
path "secret/data/pkisvc/prod/versions/+/record" {
  capabilities = ["create", "read"]
}

# The latest version's number, moved forward (cas) after each commit.
path "secret/data/pkisvc/prod/head" {
  capabilities = ["create", "read", "update"]
}

# Appended audit events (deliveries, tokens, exports): one secret each, created once.
path "secret/data/pkisvc/prod/audit/*" {
  capabilities = ["create", "read"]
}

# The API tokens (sha256 only), the operator pages' sessions, each minion's delivery state:
# changed in place under cas.
path "secret/data/pkisvc/prod/tokens" {
  capabilities = ["create", "read", "update"]
}
path "secret/data/pkisvc/prod/sessions" {
  capabilities = ["create", "read", "update"]
}
path "secret/data/pkisvc/prod/minions/*" {
  capabilities = ["create", "read", "update"]
}

# A store written by pkisvc before one secret per version (one `material` secret): read only.
path "secret/data/pkisvc/prod/material" {
  capabilities = ["read"]
}
path "secret/metadata/pkisvc/prod/material" {
  capabilities = ["read"]
}

# Listings (versions, audit days, minions).  Listing is the only metadata capability.
path "secret/metadata/pkisvc/prod/*" {
  capabilities = ["list"]
}
