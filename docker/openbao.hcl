# OpenBao for docker-compose.yml: one node, integrated raft storage on a volume.
# Initialise and unseal it once (README, "Docker"); put TLS in front of it or enable it here
# before anything leaves this host.
storage "raft" {
  path    = "/openbao/data"
  node_id = "openbao-1"
}

listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_disable     = true
}

api_addr     = "http://openbao:8200"
cluster_addr = "http://openbao:8201"
ui           = false

# The audit device.  OpenBao 2.x refuses `bao audit enable` over the API: audit devices are
# declared here (and take effect at start or on SIGHUP).  Every request is logged with its
# token's accessor and path; values are HMAC'd, never written in clear.  (HashiCorp Vault:
# `vault audit enable file file_path=…` instead.)
audit "file" "pkisvc" {
  options {
    file_path = "/openbao/logs/audit.log"
  }
}
