{#- kubernetes.cert.configured: install this minion's certificates from pkisvc's pillar.

    Writes the role's files to cert_dir (keys key_mode), the CA to the system store (+ the
    update command and the kubernetes.pem link) and to the kubelet, and removes the files the
    role must not hold; records the resolved lookup for `pkisvc doctor` (lookup.sls).  Under a
    lookup prefix nothing outside the prefix is touched: update-ca-certificates runs on the
    prefix's own directories, and links point at the host's (unprefixed) paths.  With no material or an error in pillar, one failing state and
    nothing else: no file is touched.  File contents come from pillar (contents_pillar), so
    keys never appear in the rendered SLS or in state output. #}
{%- from "kubernetes/cert/map.jinja" import cert with context %}
{%- set material = salt['pillar.get']('kubernetes:cert', {}) %}
{%- set files = material.get('files') or {} %}
{%- set problem = '' %}
{%- if material.get('error') %}
{%-   set problem = 'pkisvc: ' ~ material.error %}
{%- elif not files %}
{%-   set problem = 'no certificate material in pillar kubernetes:cert (is this minion in a pkisvc role?)' %}
{%- elif cert.ca_file not in files %}
{%-   set problem = 'pillar kubernetes:cert:files has no ' ~ cert.ca_file %}
{%- endif %}

{%- if problem %}
kubernetes-cert-material:
  test.fail_without_changes:
    - comment: {{ problem | yaml_dquote }}
{%- else %}
include:
  - kubernetes.cert.lookup

kubernetes-cert-dir:
  file.directory:
    - name: {{ cert.dir }}
    - user: {{ cert.user }}
    - group: {{ cert.group }}
    - mode: '{{ cert.dir_mode }}'
    - makedirs: True

{%-   for name in cert.files %}
{%-     if name in files %}

kubernetes-cert-file-{{ name }}:
  file.managed:
    - name: {{ cert.paths[name] }}
    - contents_pillar: kubernetes:cert:files:{{ name }}
    - user: {{ cert.user }}
    - group: {{ cert.group }}
    - mode: '{{ cert.key_mode if name in cert.key_files else cert.cert_mode }}'
    - show_changes: False
    - require:
      - file: kubernetes-cert-dir
{%-     else %}

kubernetes-cert-file-{{ name }}:
  file.absent:
    - name: {{ cert.paths[name] }}
{%-     endif %}
{%-   endfor %}

kubernetes-cert-ca-local:
  file.managed:
    - name: {{ cert.ca_local }}
    - contents_pillar: kubernetes:cert:files:{{ cert.ca_file }}
    - user: {{ cert.user }}
    - group: {{ cert.group }}
    - mode: '{{ cert.cert_mode }}'
    - makedirs: True
    - show_changes: False

kubernetes-cert-update-ca:
  cmd.run:
    - name: {{ cert.update_ca_command | yaml_dquote }}
    - onchanges:
      - file: kubernetes-cert-ca-local
    - require:
      - sls: kubernetes.cert.lookup

# A failed update would otherwise never be retried: the next run finds the CA file unchanged.
kubernetes-cert-update-ca-retry:
  file.absent:
    - name: {{ cert.ca_local }}
    - onfail:
      - cmd: kubernetes-cert-update-ca

# The host's path, not the prefixed one: the tree is right when the prefix becomes /.
kubernetes-cert-ca-link:
  file.symlink:
    - name: {{ cert.ca_link }}
    - target: {{ cert.host.ca_local }}
    - makedirs: True
    - force: True
    - require:
      - file: kubernetes-cert-ca-local
      - cmd: kubernetes-cert-update-ca

kubernetes-cert-kubelet-ca:
  file.managed:
    - name: {{ cert.kubelet_ca }}
    - contents_pillar: kubernetes:cert:files:{{ cert.ca_file }}
    - user: {{ cert.user }}
    - group: {{ cert.group }}
    - mode: '{{ cert.cert_mode }}'
    - makedirs: True
    - show_changes: False
{%- endif %}
