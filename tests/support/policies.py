"""The test policy most tests need: pods labelled app=web in namespace demo may ask kube-dns for
some names and reach what some names resolve to. One builder, so the YAML is written once."""

from __future__ import annotations

from collections.abc import Sequence


def _items(selectors: Sequence[str], indent: int) -> str:
    return "".join(f"{' ' * indent}- {selector}\n" for selector in selectors)


def web_policy(dns: Sequence[str], fqdns: Sequence[str], *, dns_port: int | str = 53,
               fqdn_port: int = 443, extra: str = "") -> str:
    """A CiliumNetworkPolicy for app=web in demo.

    ``dns``: rules.dns selectors for queries to kube-dns on ``dns_port`` (e.g.
    ``"matchName: api.demo.test"``); ``fqdns``: toFQDNs selectors whose IPs get TCP
    ``fqdn_port``; ``extra``: more egress rules, as YAML indented like the others.
    """
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: web, namespace: demo}}
spec:
  endpointSelector:
    matchLabels: {{app: web}}
  egress:
    - toEndpoints:
        - matchLabels:
            "k8s:io.kubernetes.pod.namespace": kube-system
            "k8s:k8s-app": kube-dns
      toPorts:
        - ports: [{{port: "{dns_port}", protocol: ANY}}]
          rules:
            dns:
{_items(dns, 14)}    - toFQDNs:
{_items(fqdns, 8)}      toPorts:
        - ports: [{{port: "{fqdn_port}", protocol: TCP}}]
{extra}"""
