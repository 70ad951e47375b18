# An auditor of pkisvc's history: cluster "prod", KV v2 mount "secret", prefix "pkisvc"
# (`setup.sh render auditor` rewrites them).  Reads every version's record (operation, actor,
# reason, parent, each certificate's PEM, fingerprint, serial, subject, SANs and validity),
# the change events inside them, the appended audit events, the minions' delivery state and
# KV's own metadata (creation times, how often a secret changed); refused every private key.
#
#   bao kv list -mount=secret pkisvc/prod/versions
#   bao kv get -mount=secret pkisvc/prod/versions/7/record
#   pkisvc versions / pkisvc audit   (with this token in vault.token or vault.token_file)

path "secret/data/pkisvc/prod/head" {
  capabilities = ["read"]
}
path "secret/data/pkisvc/prod/versions/+/record" {
  capabilities = ["read"]
}
path "secret/data/pkisvc/prod/audit/*" {
  capabilities = ["read"]
}
path "secret/data/pkisvc/prod/minions/*" {
  capabilities = ["read"]
}
path "secret/metadata/pkisvc/prod/*" {
  capabilities = ["read", "list"]
}

# Private keys: refused even if another policy of the same token grants them.  (A store of
# the first layout kept records and keys in one `material` secret: its history before the
# upgrade is not readable without the keys.)
path "secret/data/pkisvc/prod/versions/+/material-*" {
  capabilities = ["deny"]
}
path "secret/data/pkisvc/prod/material" {
  capabilities = ["deny"]
}
