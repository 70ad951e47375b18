{#- kubernetes.cert.view: what is installed, and whether it matches pillar.

    Per file: its sha256 on disk (what `salt-run pkisvc.report` sends pkisvc, [Q]); subject,
    issuer, serial, SHA-256 fingerprint and expiry of each certificate, the
    pkisvc version it came from (when it equals pillar), and `matches_pillar`.  Files that are
    missing or changed by hand are listed first under `differs_from_pillar`.  Certificate PEM
    only with lookup `show_pem: True`; keys never (a key file is only compared with pillar).
    Certificates are read with Salt's own x509 module, so no custom module needs syncing.
    Serials as pkisvc writes them: lowercase hex without colons or leading zeros. #}
{%- from "kubernetes/cert/map.jinja" import cert with context %}
{%- set material = salt['pillar.get']('kubernetes:cert', {}) %}
{%- set pfiles = material.get('files') or {} %}
{%- set END = '-----END CERTIFICATE-----' %}
{%- set targets = [] %}
{%- for name in cert.files %}
{%-   do targets.append((name, cert.paths[name], name)) %}
{%- endfor %}
{%- do targets.append(('ca_local', cert.ca_local, cert.ca_file)) %}
{%- do targets.append(('ca_link', cert.ca_link, cert.ca_file)) %}
{%- do targets.append(('kubelet_ca', cert.kubelet_ca, cert.ca_file)) %}
{%- set differ = [] %}
{%- set files = {} %}
{%- for label, path, source in targets %}
{%-   set entry = {'path': path} %}
{%-   set read_path = path %}
{%-   if salt['file.is_link'](path) %}
{%-     set target = salt['file.readlink'](path) %}
{%-     do entry.update({'link_to': target}) %}
{#-     Links name the host's path: follow them inside the prefix. #}
{%-     if cert.prefix and target.startswith('/') %}
{%-       set read_path = cert.prefix ~ target %}
{%-     endif %}
{%-   endif %}
{%-   if not salt['file.file_exists'](read_path) %}
{%-     do entry.update({'installed': False, 'matches_pillar': False if source in pfiles else None}) %}
{%-   else %}
{%-     set data = salt['file.read'](read_path) %}
{%-     set matches = (data == pfiles[source]) if source in pfiles else None %}
{%-     do entry.update({'installed': True, 'matches_pillar': matches,
                         'sha256': salt['file.get_hash'](read_path, 'sha256'),
                         'pkisvc_version': material.get('version') if matches else None}) %}
{%-     if source in cert.key_files %}
{%-       do entry.update({'kind': 'private key'}) %}
{%-     elif source.endswith('.pub') %}
{%-       do entry.update({'kind': 'public keys'}) %}
{%-     else %}
{%-       set certs = [] %}
{%-       set blocks = [] %}
{%-       for chunk in data.split(END) if '-----BEGIN CERTIFICATE-----' in chunk %}
{%-         set block = '-----BEGIN CERTIFICATE-----' ~ chunk.split('-----BEGIN CERTIFICATE-----')[-1] ~ END ~ '\n' %}
{%-         set info = salt['x509.read_certificate'](certificate=block) %}
{%-         do blocks.append(block) %}
{%-         do certs.append({
              'subject': info.subject_str,
              'issuer': info.issuer_str,
              'serial': (info.serial_number | replace(':', '') | lower).lstrip('0'),
              'fingerprint': info.fingerprints.sha256 | replace(':', '') | lower,
              'not_after': info.not_after | replace(' ', 'T') ~ 'Z'}) %}
{%-       endfor %}
{%-       do entry.update({'kind': 'certificate', 'certificates': certs}) %}
{%-       if cert.show_pem %}
{%-         do entry.update({'pem': blocks | join('')}) %}
{%-       endif %}
{%-     endif %}
{%-   endif %}
{%-   if entry.matches_pillar == False %}
{%-     do differ.append(label) %}
{%-   endif %}
{%-   do files.update({label: entry}) %}
{%- endfor %}
{%- set report = {'minion': grains.id, 'differs_from_pillar': differ,
                  'pillar': {'version': material.get('version'), 'role': material.get('role')},
                  'files': files} %}
{%- if material.get('error') %}
{%-   do report.pillar.update({'error': material.error}) %}
{%- endif %}

kubernetes-cert-view:
  test.show_notification:
    - text: {{ report | yaml(False) | json }}
