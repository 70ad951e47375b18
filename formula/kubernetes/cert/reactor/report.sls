{#- kubernetes.cert reactor: a host report after every state run that installs or removes
    certificates, however it was started (by hand, a highstate, the orchestration).

    On the master:
      reactor:
        - 'salt/job/*/ret/*':
          - salt://kubernetes/cert/reactor/report.sls

    For each job return of `state.apply`/`state.sls` naming kubernetes.cert,
    kubernetes.cert.configured or kubernetes.cert.removed (or a highstate), the master runs
    `pkisvc.report` for that one minion: the runner runs kubernetes.cert.view on it (queued
    behind any state run in progress) and posts what it finds.  The event's minion id is only
    a hint of whom to ask: a minion can fire this tag itself with any id, but what is reported
    comes from the master's own job to the minion it names, keyed by the id Salt
    authenticated.  The view's own returns do not match, so a report starts no other. #}
{%- set ours = ('kubernetes.cert', 'kubernetes.cert.configured', 'kubernetes.cert.removed') %}
{%- set fun = data.get('fun') %}
{%- set mods = [] %}
{%- for arg in data.get('fun_args') or [] if arg is string and '=' not in arg %}
{%-   do mods.extend(arg.split(',')) %}
{%- endfor %}
{%- set named = mods | map('trim') | select('in', ours) | list %}
{%- set highstate = fun == 'state.highstate' or (fun == 'state.apply' and not mods) %}
{%- set minion = data.get('id') %}
{%- if minion is string and (highstate or (fun in ('state.apply', 'state.sls') and named)) %}

kubernetes-cert-report:
  runner.pkisvc.report:
    - args:
      - minions: [{{ minion | json }}]
      - after: {{ ('highstate' if highstate else named | first) | json }}
{%- endif %}
