{#- kubernetes.cert.orch.rotate — the seed's multi-master regeneration, run on the Salt master:

      salt-run state.orchestrate kubernetes.cert.orch.rotate \
        pillar='{"kubernetes": {"cert": {"orch": {"rotate": "staged"}}}}'

    0. before anything: the targets from accepted minion keys (masters, nodes: an anchored
       regular expression or a list of ids), every one answering, every pre/restart state
       existing on each (salt-run pkisvc.targets); otherwise one failing state naming them;
    1. ask pkisvc for the rotation (`rotate`: none, immediate, staged, continue, finish, or
       renew — the leaves inside renew_before, nothing when nothing is due);
    2. master by master: refresh pillar, kubernetes.cert.lookup, pre_states,
       kubernetes.cert.configured, then
       restart_states where configured changed something (`restart: always` to force them,
       e.g. after a failed run) — a master that fails or does not answer stops the run, the
       next masters stay untouched;
    3. then all nodes the same way; then what every target installed is reported to pkisvc
       (salt-run pkisvc.report, `report: false` to skip), and a staged rotation's next step
       waits up to `gate_wait` seconds for every host to have installed the current phase
       (pkisvc's gate, [Q]; `force: true` goes past it, audited as forced);
    4. then post_commands on post_target (the first master by default); after `sa-finish`
       also sa_post_commands (opt-in: legacy token secrets signed by the dropped key).
    The service-account key ([M]): `sa-staged` publishes the new key (1-3), then makes it the
    signer (1-3); `sa-finish`, run once `sa.overlap` has passed, drops the old key (1-3).
    A staged rotation does 1-3 for each of its three phases (trust both CAs, switch the leaves,
    trust only the new CA), so no host ever holds material its peers reject.
    Every target and command comes from pillar kubernetes:cert:orch (orch/defaults.yaml). -#}
{%- import_yaml "kubernetes/cert/orch/defaults.yaml" as defaults %}
{%- set orch = salt['slsutil.merge'](defaults.orch, salt['pillar.get']('kubernetes:cert:orch', {}),
                                     strategy='recurse') %}

{#- Targets from accepted keys, checked before anything changes (the runner's docstring). #}
{%- set plan = salt['saltutil.runner']('pkisvc.targets', masters=orch.masters, nodes=orch.nodes,
                                       states=orch.pre_states + orch.restart_states,
                                       timeout=orch.answer_timeout) %}
{%- if plan is not mapping %}
{%-   set problems = ['salt-run pkisvc.targets failed: ' ~ plan] %}
{%- else %}
{%-   set problems = plan.problems %}
{%-   set masters = plan.masters %}
{%-   set nodes = plan.nodes %}
{%- endif %}

{%- set phases = {'none': [None], 'immediate': ['immediate'], 'staged': ['staged', 'continue', 'finish'],
                  'continue': ['continue'], 'finish': ['finish'], 'renew': ['renew'],
                  'sa-staged': ['sa-staged', 'sa-continue'], 'sa-continue': ['sa-continue'],
                  'sa-finish': ['sa-finish'], 'sa-immediate': ['sa-immediate']} %}
{%- if orch.rotate not in phases %}
kubernetes-cert-orch-bad-rotate:
  test.fail_without_changes:
    - name: "kubernetes:cert:orch:rotate must be one of {{ phases | list | join(', ') }}, not {{ orch.rotate }}"
{%- elif problems %}
kubernetes-cert-orch-targets:
  test.fail_without_changes:
    - comment: {{ ('nothing rotated: ' ~ problems | join('; ')) | yaml_dquote }}
{%- else %}
{%- set ns = namespace(prev=None) %}

{%- for phase in phases[orch.rotate] %}
{%- set p = loop.index %}

{%- if phase %}
kubernetes-cert-orch-{{ p }}-rotate:
  salt.runner:
{%- if phase == 'renew' %}
    - name: pkisvc.renew
{%- elif phase.startswith('sa-') %}
    - name: pkisvc.sa_rotate
{%- if phase in ('sa-staged', 'sa-immediate') %}
    - mode: {{ phase[3:] }}
{%- else %}
    - step: {{ phase[3:] }}
    - wait: {{ orch.gate_wait }}
{%- endif %}
{%- if phase == 'sa-finish' and orch.sa_force %}
    - force: true
{%- endif %}
    - reason: {{ orch.reason | yaml_dquote }}
{%- else %}
    - name: pkisvc.rotate
{%- if phase in ('immediate', 'staged') %}
    - mode: {{ phase }}
{%- else %}
    - step: {{ phase }}
    - wait: {{ orch.gate_wait }}
{%- if orch.force %}
    - force: true
{%- endif %}
{%- endif %}
    - reason: {{ orch.reason | yaml_dquote }}
{%- endif %}
{%- for key, value in orch.runner.items() %}
    - {{ key }}: {{ value | json }}
{%- endfor %}
{%- if ns.prev %}
    - require:
      - {{ ns.prev }}
{%- endif %}
{%- set ns.prev = "salt: kubernetes-cert-orch-" ~ p ~ "-rotate" %}
{%- endif %}

{#- Masters one at a time, then all nodes together: the seed's order. #}
{%- set groups = [] %}
{%- for m in masters %}{% do groups.append(('master-' ~ m, [m])) %}{% endfor %}
{%- if nodes %}{% do groups.append(('nodes', nodes)) %}{% endif %}
{%- for name, targets in groups %}
{%- set id = 'kubernetes-cert-orch-' ~ p ~ '-' ~ name %}

{{ id }}-refresh:
  salt.function:
    - name: saltutil.refresh_pillar
    - tgt: {{ targets | json }}
    - tgt_type: list
    - expect_minions: true
    - kwarg:
        wait: true
{%- if ns.prev %}
    - require:
      - {{ ns.prev }}
{%- endif %}

{#- The recorded lookup on its own first: recording it is no reason to restart anything. #}
{{ id }}-lookup:
  salt.state:
    - tgt: {{ targets | json }}
    - tgt_type: list
    - sls: kubernetes.cert.lookup
    - failhard: true
    - queue: true
    - require:
      - salt: {{ id }}-refresh

{{ id }}-configured:
  salt.state:
    - tgt: {{ targets | json }}
    - tgt_type: list
    - sls: {{ (orch.pre_states + ['kubernetes.cert.configured']) | json }}
    - failhard: true
    - queue: true
    - require:
      - salt: {{ id }}-lookup
{%- set ns.prev = "salt: " ~ id ~ "-configured" %}
{%- if orch.restart_states %}

{{ id }}-restart:
  salt.state:
    - tgt: {{ targets | json }}
    - tgt_type: list
    - sls: {{ orch.restart_states | json }}
    - failhard: true
    - queue: true
    - require:
      - salt: {{ id }}-configured
{%- if orch.restart != 'always' %}
    - onchanges:
      - salt: {{ id }}-configured
{%- endif %}
{%- set ns.prev = "salt: " ~ id ~ "-restart" %}
{%- endif %}
{%- endfor %}
{%- if orch.report %}

{#- What every target installed, to pkisvc ([Q]), in one job: the next phase's gate waits
    for it. #}
kubernetes-cert-orch-{{ p }}-report:
  salt.runner:
    - name: pkisvc.report
    - minions: {{ (masters + nodes) | json }}
    - after: kubernetes.cert.configured
{%- for key in ('url', 'ca_cert') if key in orch.runner %}
    - {{ key }}: {{ orch.runner[key] | json }}
{%- endfor %}
    - require:
      - {{ ns.prev }}
{%- set ns.prev = "salt: kubernetes-cert-orch-" ~ p ~ "-report" %}
{%- endif %}
{%- endfor %}

{%- set post_target = orch.post_target or (masters | first) %}
{%- set post_commands = orch.post_commands + (orch.sa_post_commands if orch.rotate == 'sa-finish' else []) %}
{%- for command in post_commands if post_target %}

kubernetes-cert-orch-post-{{ loop.index }}:
  salt.function:
    - name: cmd.run
    - tgt: {{ post_target | json }}
    - expect_minions: true
    - arg:
      - {{ command | json }}
    - kwarg:
        python_shell: true
{%- if ns.prev %}
    - require:
      - {{ ns.prev }}
{%- endif %}
{%- set ns.prev = "salt: kubernetes-cert-orch-post-" ~ loop.index %}
{%- endfor %}
{%- endif %}
