{#- kubernetes.cert.removed: delete what `configured` created — the seed's list of certificate
    files, the kubernetes.pem link, the kubelet's CA copy and the recorded lookup — then
    refresh the system CA store if its kubernetes CA went away.  Under a prefix, the prefix's
    update-ca-certificates configuration and hooks directory stay: the refresh needs them. #}
{%- from "kubernetes/cert/map.jinja" import cert with context %}
{%- for name in cert.files %}
kubernetes-cert-removed-{{ name }}:
  file.absent:
    - name: {{ cert.paths[name] }}
{% endfor %}
kubernetes-cert-removed-ca-link:
  file.absent:
    - name: {{ cert.ca_link }}

kubernetes-cert-removed-kubelet-ca:
  file.absent:
    - name: {{ cert.kubelet_ca }}

kubernetes-cert-removed-lookup:
  file.absent:
    - name: {{ cert.lookup_file.rsplit('/', 1)[0] }}

kubernetes-cert-removed-ca-local:
  file.absent:
    - name: {{ cert.ca_local }}

kubernetes-cert-removed-update-ca:
  cmd.run:
    - name: {{ cert.update_ca_command | yaml_dquote }}
    - onchanges:
      - file: kubernetes-cert-removed-ca-local
