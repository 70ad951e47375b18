# kubernetes.cert: install this minion's certificates from pillar (same as .configured).
include:
  - kubernetes.cert.configured
