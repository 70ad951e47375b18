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
