{#- kubernetes.cert.removed: delete exactly the seed's list of certificate files, then refresh
    the system CA store if its kubernetes CA went away. #}
{%- from "kubernetes/cert/map.jinja" import cert with context %}
{%- for name in cert.files %}
kubernetes-cert-removed-{{ name }}:
  file.absent:
    - name: {{ cert.paths[name] }}
{% endfor %}
kubernetes-cert-removed-ca-local:
  file.absent:
    - name: {{ cert.ca_local }}

kubernetes-cert-removed-update-ca:
  cmd.run:
    - name: {{ cert.update_ca_command | yaml_dquote }}
    - onchanges:
      - file: kubernetes-cert-removed-ca-local
