{#- kubernetes.cert.lookup: what `configured` needs on the host before any certificate.

    Records the resolved lookup (every path as the host sees it, without the prefix) in
    /etc/kubernetes-cert/lookup.json under the prefix, for `pkisvc doctor --root PREFIX`:
    hosts have neither this formula's defaults.yaml nor pillar.  Under a prefix, also the
    prefix's own update-ca-certificates sandbox: an empty configuration file where there is
    none (the prefix's bundle then holds the prefix's CAs only; put a copy of the host's
    there to include the system CAs), an empty hooks directory (so no host hook runs), and
    the certificate directory.  `configured` includes this; the orchestration applies it
    first on its own, so a first run records the lookup without firing restart states. #}
{%- from "kubernetes/cert/map.jinja" import cert with context %}

kubernetes-cert-lookup:
  file.managed:
    - name: {{ cert.lookup_file }}
    - contents: {{ (cert.host | tojson(indent=2)) | string | json }}
    - mode: '0644'
    - makedirs: True
{%- if cert.prefix %}

kubernetes-cert-prefix-certsconf:
  file.managed:
    - name: {{ cert.ca_certsconf }}
    - replace: False
    - makedirs: True

kubernetes-cert-prefix-hooksdir:
  file.directory:
    - name: {{ cert.ca_hooksdir }}
    - clean: True
    - makedirs: True

kubernetes-cert-prefix-etccertsdir:
  file.directory:
    - name: {{ cert.ca_store.rsplit('/', 1)[0] }}
    - makedirs: True
{%- endif %}
